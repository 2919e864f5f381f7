"""The same config and seed give the same decisions whatever the layout: three nodes or one, the shard size,
the actor count, and the order in which the input files are listed (issue 12 §3). On the same layout the
output files are byte-identical.

The three-node side is the fault tests' fault-free run (tests/conftest.py `three_node_clean`)."""

import hashlib
import os
import shutil

import pyarrow.parquet as pq
import pytest

from tests.multinode import finish, run_on, selected_ids, three_node_config

DECISIONS = ["id", "status", "reason", "cluster", "entropy"]  # `source` names the file, renamed on purpose


def _ledger(out):
    table = pq.read_table(out / "ledger", columns=DECISIONS).sort_by("id")
    return table.to_pydict()


def _digests(out):
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.parquet"))
    }


@pytest.fixture(scope="module")
def one_node(ray_cluster, three_node_clean):
    """The same rows on the one-node cluster, files renamed so that they are listed in the reverse order,
    in shards of 7 rows, with two embedding actors."""
    root = three_node_clean.parent
    for i, path in enumerate(sorted((root / "corpus").glob("*.jsonl"))):
        target = root / "reversed" / f"{7 - i:02d}-{path.name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
    config = three_node_config(root, "one-node", corpus="reversed", shard_rows=7, embed_actors=2)
    finish(run_on(ray_cluster, config, {**os.environ, "RAY_ADDRESS": ray_cluster}))
    return root / "one-node"


def test_one_node_and_three_nodes_decide_every_row_the_same(three_node_clean, one_node):
    assert _ledger(one_node) == _ledger(three_node_clean)
    assert selected_ids(one_node) == selected_ids(three_node_clean)
    sources = set(pq.read_table(one_node / "ledger", columns=["source"]).column("source").to_pylist())
    assert {s.rsplit("/", 1)[-1] for s in sources} == {f"{7 - i:02d}-part-{i}.jsonl" for i in range(8)}  # renamed


def test_the_same_layout_writes_byte_identical_files(three_nodes, three_node_clean):
    root = three_node_clean.parent
    finish(run_on(three_nodes.address, three_node_config(root, "again"), three_nodes.env))
    assert _digests(root / "again") == _digests(three_node_clean)
    assert _digests(three_node_clean)  # there was something to compare

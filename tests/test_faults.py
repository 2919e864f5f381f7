"""A worker node lost in the middle of pass 1, on a real three-node cluster (head + 2 workers on this machine)."""

import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import bbc_sample, write_jsonl
from tests.multinode import LocalCluster

FILES, ROWS_PER_FILE = 8, 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), worker_cpus=(2, 2), head_cpus=0)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rows = bbc_sample(FILES * ROWS_PER_FILE, seed=21, max_chars=200)
    for i in range(FILES):
        write_jsonl(root / "corpus" / f"part-{i}.jsonl", rows[i * ROWS_PER_FILE : (i + 1) * ROWS_PER_FILE])
    return root


def _config(root, name):
    path = root / f"{name}.yaml"
    path.write_text(
        f"input: {{path: {root / 'corpus'}, id_field: id}}\n"
        f"output: {{path: {root / name}}}\n"
        "embed: {batch_size: 8, max_tokens: 16}\n"
        "scorers: [{name: entropy, max_tokens: 16, batch_size: 8}]\n"
        "cluster: {k: 3}\n"
        "select: {budget: 0.3, policy: stratified, score: entropy, seed: 0}\n"
        f"work_dir: {root / (name + '-work')}\n"
    )
    return path


def _run(cluster, config):
    return subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", "run", str(config), "--address", cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster.env,
    )


def _selected(out):
    return sorted(pq.read_table(out / "selected").column("id").to_pylist())


def test_losing_a_worker_node_mid_pass_1_still_completes_with_the_same_output(cluster, corpus):
    clean = _run(cluster, _config(corpus, "clean"))
    out, _ = clean.communicate(timeout=900)
    assert clean.returncode == 0, out[-3000:]

    faulty = _run(cluster, _config(corpus, "faulty"))
    shards = corpus / "faulty-work"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and faulty.poll() is None and not list(shards.rglob("scores/*.parquet")):
        time.sleep(0.1)
    assert faulty.poll() is None, "the run ended before the node could be killed"
    cluster.kill_node("127.0.0.3")
    out, _ = faulty.communicate(timeout=900)  # nothing hangs: a lost node is noticed, its work redone
    assert faulty.returncode == 0, out[-5000:]
    ledger = pq.read_table(corpus / "faulty" / "ledger")
    assert ledger.num_rows == FILES * ROWS_PER_FILE
    assert len(set(ledger.column("id").to_pylist())) == ledger.num_rows  # no row scored twice into the output
    assert _selected(corpus / "faulty") == _selected(corpus / "clean")

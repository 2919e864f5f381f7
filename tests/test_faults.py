"""A worker node lost in the middle of pass 1, and in the middle of the bandit's rounds, on a real three-node
cluster (a head with no CPUs + 2 workers, on this machine): the run completes with the fault-free output."""

import json
import shutil
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


def _config(root, name, select="{budget: 0.3, policy: stratified, score: entropy, seed: 0}", work=None):
    path = root / f"{name}.yaml"
    path.write_text(
        f"input: {{path: {root / 'corpus'}, id_field: id}}\n"
        f"output: {{path: {root / name}}}\n"
        "embed: {batch_size: 8, max_tokens: 16}\n"
        "scorers: [{name: entropy, max_tokens: 16, batch_size: 8}]\n"
        "cluster: {k: 3}\n"
        f"select: {select}\n"
        f"work_dir: {work or root / (name + '-work')}\n"
        "shard_rows: 32\n"  # several shards from a small corpus, so the run can be cut between them
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


def _finish(proc):
    out, _ = proc.communicate(timeout=900)  # nothing hangs: a lost node is noticed, its work redone
    assert proc.returncode == 0, out[-5000:]


def _selected(out):
    return sorted(pq.read_table(out / "selected").column("id").to_pylist())


@pytest.fixture(scope="module")
def clean(cluster, corpus):
    """The fault-free run; its work dir (pass 1 done) seeds the bandit runs."""
    _finish(_run(cluster, _config(corpus, "clean")))
    return corpus / "clean"


def test_losing_a_worker_node_mid_pass_1_still_completes_with_the_same_output(cluster, corpus, clean):
    faulty = _run(cluster, _config(corpus, "faulty"))
    shards = corpus / "faulty-work"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and faulty.poll() is None and not list(shards.rglob("scores/*.parquet")):
        time.sleep(0.1)
    assert faulty.poll() is None, "the run ended before the node could be killed"
    try:
        cluster.kill_node("127.0.0.3")
        _finish(faulty)
    finally:
        cluster.revive("127.0.0.3")
    ledger = pq.read_table(corpus / "faulty" / "ledger")
    assert ledger.num_rows == FILES * ROWS_PER_FILE
    assert len(set(ledger.column("id").to_pylist())) == ledger.num_rows  # no row scored twice into the output
    assert _selected(corpus / "faulty") == _selected(clean)


# Two probe actors (SPREAD: one per worker node) and 2-row batches, so that every round calls both nodes.
BANDIT = (
    "{budget: 0.25, policy: bandit, seed: 0, params: {algorithm: ucb, per_arm: 4, arms_per_round: 3, "
    "max_rounds: 12, probe_budget: 1.0, probe_scorer: {name: loss, max_tokens: 16, batch_size: 2, actors: 2}}}"
)


def test_losing_a_worker_node_mid_bandit_rounds_still_completes_with_the_same_output(cluster, corpus, clean):
    runs = {}
    for name in ("bandit-clean", "bandit-faulty"):  # pass 1 reused from the clean run; no saved rounds
        shutil.copytree(corpus / "clean-work", corpus / f"{name}-work", ignore=shutil.ignore_patterns("bandit-*"))
        runs[name] = _config(corpus, name, select=BANDIT, work=corpus / f"{name}-work")
    _finish(_run(cluster, runs["bandit-clean"]))

    faulty = _run(cluster, runs["bandit-faulty"])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and faulty.poll() is None:
        saved = list((corpus / "bandit-faulty-work").glob("*/bandit-*/state.json"))
        if saved:
            break
        time.sleep(0.05)
    assert faulty.poll() is None and saved, "the run ended before the node could be killed"
    try:
        cluster.kill_node("127.0.0.4")  # holds one of the two probe actors, whichever node the allocator is on
        at_kill = json.loads(saved[0].read_text())["round"]
        _finish(faulty)
    finally:
        cluster.revive("127.0.0.4")

    manifests = {n: json.loads((corpus / n / "manifest.json").read_text()) for n in runs}
    bandit = {n: m["selection"]["bandit"] for n, m in manifests.items()}
    assert at_kill < bandit["bandit-faulty"]["rounds"] == 12, "the node was not lost in the middle of the rounds"
    assert bandit["bandit-faulty"]["reward_history"] == bandit["bandit-clean"]["reward_history"]
    assert _selected(corpus / "bandit-faulty") == _selected(corpus / "bandit-clean")

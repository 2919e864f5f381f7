"""A worker node lost in the middle of pass 1, and in the middle of the bandit's rounds, on a real three-node
cluster (a head with no CPUs + 2 workers, on this machine): the run completes with the fault-free output.

The cluster, the corpus and the fault-free run are session fixtures (tests/conftest.py), shared with
tests/test_determinism.py."""

import json
import shutil
import time

import pyarrow.parquet as pq

from tests.conftest import tiny_lm
from tests.multinode import FILES, ROWS_PER_FILE, finish, run_on, selected_ids, three_node_config


def test_losing_a_worker_node_mid_pass_1_still_completes_with_the_same_output(three_nodes, three_node_clean):
    corpus = three_node_clean.parent
    faulty = run_on(three_nodes.address, three_node_config(corpus, "faulty"), three_nodes.env)
    shards = corpus / "faulty-work"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and faulty.poll() is None and not list(shards.rglob("scores/*.parquet")):
        time.sleep(0.1)
    assert faulty.poll() is None, "the run ended before the node could be killed"
    try:
        three_nodes.kill_node("127.0.0.3")
        finish(faulty)
    finally:
        three_nodes.revive("127.0.0.3")
    ledger = pq.read_table(corpus / "faulty" / "ledger")
    assert ledger.num_rows == FILES * ROWS_PER_FILE
    assert len(set(ledger.column("id").to_pylist())) == ledger.num_rows  # no row scored twice into the output
    assert selected_ids(corpus / "faulty") == selected_ids(three_node_clean)


# Two probe actors (SPREAD: one per worker node) and 2-row batches, so that every round calls both nodes.
BANDIT = (
    "{budget: 0.25, policy: bandit, seed: 0, params: {algorithm: ucb, per_arm: 4, arms_per_round: 3, "
    "max_rounds: 12, probe_budget: 1.0, probe_scorer: {name: loss, model: " + tiny_lm() + ", max_tokens: 16, batch_size: 2, actors: 2}}}"
)


def test_losing_a_worker_node_mid_bandit_rounds_still_completes_with_the_same_output(three_nodes, three_node_clean):
    corpus = three_node_clean.parent
    runs = {}
    for name in ("bandit-clean", "bandit-faulty"):  # pass 1 reused from the clean run; no saved rounds
        shutil.copytree(corpus / "clean-work", corpus / f"{name}-work", ignore=shutil.ignore_patterns("bandit-*"))
        runs[name] = three_node_config(corpus, name, select=BANDIT, work=corpus / f"{name}-work")
    finish(run_on(three_nodes.address, runs["bandit-clean"], three_nodes.env))

    faulty = run_on(three_nodes.address, runs["bandit-faulty"], three_nodes.env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and faulty.poll() is None:
        saved = list((corpus / "bandit-faulty-work").glob("*/bandit-*/state.json"))
        if saved:
            break
        time.sleep(0.05)
    assert faulty.poll() is None and saved, "the run ended before the node could be killed"
    try:
        three_nodes.kill_node("127.0.0.4")  # holds one of the two probe actors, whichever node the allocator is on
        at_kill = json.loads(saved[0].read_text())["round"]
        finish(faulty)
    finally:
        three_nodes.revive("127.0.0.4")

    manifests = {n: json.loads((corpus / n / "manifest.json").read_text()) for n in runs}
    bandit = {n: m["selection"]["bandit"] for n, m in manifests.items()}
    assert at_kill < bandit["bandit-faulty"]["rounds"] == 12, "the node was not lost in the middle of the rounds"
    assert bandit["bandit-faulty"]["reward_history"] == bandit["bandit-clean"]["reward_history"]
    assert selected_ids(corpus / "bandit-faulty") == selected_ids(corpus / "bandit-clean")

"""Selection on Ray planned on statistics and applied in the stream (raysel/select/stream.py), on a real run:
against the in-memory policies, across the in-memory and distributed shuffles and block sizes, and with the
driver's memory flat while the rows grow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import parse_config
from raysel.context import RunContext
from raysel.pipeline import collect_rows, run, select_pass
from tests.conftest import BAD_LINES, bbc_sample, tiny_lm, write_jsonl

REPO = Path(__file__).resolve().parents[2]
# topk and threshold are one global cut each: tests/select/test_plan_apply.py checks them against `select` in
# memory; here, a run of each kind of plan (a hash draw, cuts per cluster, two steps) on Ray.
POLICIES = [
    {"policy": "random"},
    {"policy": "stratified", "score": "loss"},
    {"policy": "hard_easy", "score": "loss", "params": {"hard_fraction": 0.2}},
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files of real articles with bad lines and repeated ids."""
    root = tmp_path_factory.mktemp("stream")
    rows = bbc_sample(60, seed=9, max_chars=200)
    rows[7]["id"] = rows[3]["id"]  # repeated inside a file
    rows[45]["id"] = rows[2]["id"]  # and across files
    write_jsonl(root / "corpus" / "a.jsonl", rows[:30], BAD_LINES)
    write_jsonl(root / "corpus" / "b.jsonl", rows[30:])
    return root


def _config(root: Path, name: str, select: dict, **extra) -> dict:
    return {
        "input": {"path": str(root / "corpus"), "id_field": "id"},
        "output": {"path": str(root / name)},
        "embed": {"batch_size": 16, "max_tokens": 16},
        "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 16, "batch_size": 8}],
        "cluster": {"k": 3, "seed": 0},
        "select": {"budget": 0.4, "seed": 1, **select},
        "work_dir": str(root / "work"),
        **extra,
    }


def _ledger(out: Path) -> list[dict]:
    """The ledger sorted by id, NaN as None (so that two ledgers compare equal row by row)."""
    rows = [{k: None if v != v else v for k, v in r.items()} for r in pq.read_table(out / "ledger").to_pylist()]
    return sorted(rows, key=lambda r: (r["id"], r["source"], r["row"]))


@pytest.mark.parametrize("select", POLICIES, ids=lambda s: s["policy"])
def test_streamed_selection_agrees_with_the_in_memory_policy(corpus, ray_cluster, select):
    config = parse_config(_config(corpus, f"out-{select['policy']}", select))
    result = run(config)
    ledger = _ledger(Path(config.output.path))
    assert len(ledger) == 60 + len(BAD_LINES)  # every input row, once
    assert len({(r["source"], r["row"]) for r in ledger}) == len(ledger)
    assert sum(r["reason"].startswith("duplicate id (first at ") for r in ledger) == 2

    key = result.manifest["reuse"]["scores"]["key"]
    assigned = next(p for p in (corpus / "work" / key).glob("assigned-*") if "-d2-" not in p.name)
    reference, info = select_pass(config, collect_rows(str(assigned)))  # the in-memory policy, the slow reference
    want = reference.to_pylist()
    assert Counter(r["status"] for r in ledger) == Counter(r["status"] for r in want)
    assert result.manifest["selection"]["budget_rows"] == info["budget_rows"]
    chosen = lambda rows: Counter(r["cluster"] for r in rows if r["status"] == "selected")  # noqa: E731
    if select["policy"] in ("stratified", "hard_easy"):
        assert chosen(ledger) == chosen(want)  # same counts per cluster (no ties in the loss)
        assert {r["id"] for r in ledger if r["status"] == "selected"} == {
            r["id"] for r in want if r["status"] == "selected"
        }
    assert {r["reason"] for r in ledger if r["status"] != "selected"} == {
        r["reason"] for r in want if r["status"] != "selected"
    }
    selected = pq.read_table(Path(config.output.path) / "selected")
    assert selected.num_rows == result.counts["selected"]


def test_the_same_decisions_through_the_distributed_shuffles_and_other_blocks(corpus, ray_cluster):
    """The in-memory shortcuts (repeated ids, the cut passes on the driver, the selected rows by file) against Ray, and other block
    and shard sizes: the ledger sorted by id and the selected records are the same."""
    config = _config(corpus, "out-a", {"policy": "stratified", "score": "loss"})
    run(parse_config(config))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from raysel.config import parse_config
        from raysel.pipeline import run
        config = json.loads({json.dumps(json.dumps(_config(corpus, "out-b", {"policy": "stratified", "score": "loss"})))})
        run(parse_config(config))
        """
    )
    env = {**os.environ, "RAYSEL_IN_MEMORY_ROWS": "0", "RAYSEL_TARGET_BLOCK_BYTES": "4096"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _ledger(corpus / "out-a"), _ledger(corpus / "out-b")
    assert a == b
    rows = lambda out: sorted(pq.read_table(out / "selected").to_pylist(), key=lambda r: r["id"])  # noqa: E731
    assert rows(corpus / "out-a") == rows(corpus / "out-b")


MEMORY_SCRIPT = """
import json, os, sys, threading, time
sys.path.insert(0, {repo!r})
import numpy as np, psutil, pyarrow as pa, pyarrow.parquet as pq, ray
from raysel.config import parse_config
from raysel.io.read import list_input
from raysel import pipeline
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
root = {root!r}
config = parse_config(json.loads({config!r}))
files = list_input(config.input)
key = pipeline.score_key(config, files)
scores = os.path.join(config.resolved_work_dir(), key, "scores")
os.makedirs(scores, exist_ok=True)
rng = np.random.default_rng(0)
n, per = {rows}, {rows} // 10
for f in range(10):  # the scored shards pass 1 would write (8-dim embeddings), so that the test is quick
    rel = files[f].rel
    idx = np.arange(per)
    pq.write_table(pa.table({{
        "id": [f"{{rel}}-{{i}}" for i in idx], "source": [rel] * per, "row": idx, "reason": [""] * per,
        "text_cut": np.zeros(per, bool), "embed_cut": np.zeros(per, bool), "lm_cut": np.zeros(per, bool),
        "loss": rng.random(per), "embedding": list(rng.normal(size=(per, 8)).astype(np.float32)),
    }}), os.path.join(scores, f"part-{{f}}.parquet"))
open(os.path.join(config.resolved_work_dir(), key, "_SUCCESS"), "w").close()
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.01)
import faiss, torch, transformers  # noqa: F401  the manifest's version lookups: fixed costs, before the baseline
ray.data.range(10).materialize()  # Ray Data's own start-up allocations, before the baseline
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.2)
base = proc.memory_info().rss
pipeline.run(config)
streamed = peak[0] - base
peak[0] = 0
base = proc.memory_info().rss
assigned = next(p for p in os.listdir(os.path.join(config.resolved_work_dir(), key)) if p.startswith("assigned-"))
table = pipeline.collect_rows(os.path.join(config.resolved_work_dir(), key, assigned))  # today's collection
collected = peak[0] - base
print(json.dumps({{"streamed_mib": streamed / 2**20, "collected_mib": collected / 2**20}}))
"""


def test_the_driver_does_not_hold_the_rows(tmp_path, ray_cluster):
    """400,000 rows through selection and writing: the driver's peak grows by far less than collecting the rows
    (what pass 3 did before) grows it, in the same process. The distributed paths are forced. What the streamed
    run adds (~20 MiB here) does not grow with the rows; the collection adds ~0.2 KiB a row."""
    rows = 400_000
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(10):
        with open(corpus / f"part-{f}.jsonl", "w") as out:
            out.writelines(f'{{"id": "part-{f}.jsonl-{i}", "text": "t{i}"}}\n' for i in range(rows // 10))
    config = {
        "input": {"path": str(corpus), "id_field": "id"},
        "output": {"path": str(tmp_path / "out"), "shard_rows": 50_000},
        "scorers": [{"name": "loss"}],
        "cluster": {"k": 16, "sample": 5_000},
        "select": {"budget": 0.1, "policy": "stratified", "score": "loss"},
        "work_dir": str(tmp_path / "work"),
    }
    script = MEMORY_SCRIPT.format(repo=str(REPO), root=str(tmp_path), config=json.dumps(config), rows=rows)
    env = {**os.environ, "RAYSEL_IN_MEMORY_ROWS": "0"}
    env.pop("RAY_ADDRESS", None)  # its own cluster: the driver measured is this process alone
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["collected_mib"] > 60, measured  # the test can see a driver that holds the rows
    assert measured["streamed_mib"] < 0.5 * measured["collected_mib"], measured
    index = json.loads((tmp_path / "out" / "selected" / "_index.json").read_text())
    assert index["rows"] == rows // 10 and [s["rows"] for s in index["shards"]] == [rows // 10]
    assert pa.concat_tables([pq.read_table(tmp_path / "out" / "ledger")]).num_rows == rows


def test_an_in_memory_policy_refuses_more_rows_than_the_driver_is_sized_for(corpus, ray_cluster):
    config = corpus / "mig.yaml"
    config.write_text(json.dumps(_config(corpus, "out-mig", {"policy": "mig", "score": "loss"})))
    env = {**os.environ, "RAYSEL_MAX_DRIVER_ROWS": "10"}
    proc = subprocess.run(
        [sys.executable, "-m", "raysel.cli", "run", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "policy 'mig' selects in memory on the driver" in proc.stderr and "takes at most 10 rows" in proc.stderr
    assert (
        "random, stratified, threshold, topk" in proc.stderr.replace("hard_easy, ", "")
        and "Traceback" not in proc.stderr
    )



@pytest.mark.parametrize(
    "select",
    [
        {"policy": "ccs", "score": "loss", "params": {"beta": 0.2, "strata": 4, "balance": "label"}},
        {"policy": "stratified", "score": "loss", "params": {"balance": "label"}},
        {"policy": "d2", "score": "loss", "params": {"k": 5}},
        {"policy": "d2", "score": "loss", "order": "asc", "params": {"k": 3, "balance": "label"}},
    ],
    ids=["ccs-label", "stratified-label", "d2-cluster", "d2-label"],
)
def test_class_balanced_budgets_and_d2_on_ray_against_the_in_memory_policy(corpus, ray_cluster, select):
    raw = _config(corpus, f"out-label-{select['policy']}-{select.get('order', 'desc')}", select)
    config = parse_config({**raw, "input": {**raw["input"], "label_field": "topic"}})
    result = run(config)
    ledger = _ledger(Path(config.output.path))
    work = corpus / "work" / result.manifest["reuse"]["scores"]["key"]
    assigned = next(p for p in work.glob("assigned-*") if "-d2-" not in p.name)  # not d2's copy with d2_rank
    context = RunContext(config, result.manifest["reuse"]["scores"]["uri"], "", [])  # d2 reads the embeddings
    want = select_pass(config, collect_rows(str(assigned)), context)[0].to_pylist()  # in memory, by sorting
    status = lambda rows: {(r["id"], r["source"], r["row"]): (r["status"], r["reason"]) for r in rows}  # noqa: E731
    assert status(ledger) == status(want)  # the same rows, the same reasons
    kept = Counter(r["label"] for r in ledger if r["status"] == "selected")
    usable = Counter(r["label"] for r in ledger if r["status"] != "quarantined")
    assert sum(kept.values()) == result.manifest["selection"]["budget_rows"]
    if select["params"].get("balance") == "label":
        for label, n in usable.items():  # each topic's share of the budget, by its share of the rows
            assert abs(kept[label] - 0.4 * n) <= 1.5
    if select["policy"] == "d2":
        assert all(r["status"] == "quarantined" or r["d2_rank"] is not None for r in ledger)

"""Drop steps before the policy (raysel/select/drop.py): semdedup per cluster in Ray tasks and drop_noisy by an exact
global cut, each on a real run against its in-memory reference, with bad rows, repeated ids and near-duplicates in
the corpus; every input row in the ledger once; a planned policy after them never collects the rows on the driver."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel import pipeline
from raysel.config import parse_config
from raysel.context import RunContext
from raysel.pipeline import collect_rows, run
from raysel.select import POLICIES, Candidates
from raysel.select.semdedup import drop_near_duplicates
from tests.conftest import BAD_LINES, bbc_sample, tiny_lm, write_jsonl

ROWS = 60
COPIES = {0: "", 5: "", 9: "", 40: " Reuters", 33: " (updated)"}  # exact repeats, and two with a word added


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files of real articles, with bad lines, two repeated ids and five near-duplicates under new ids."""
    root = tmp_path_factory.mktemp("drop")
    rows = bbc_sample(ROWS, seed=4, max_chars=200)
    rows[7]["id"] = rows[3]["id"]  # a repeated id inside a file
    rows[45]["id"] = rows[2]["id"]  # and across files
    copies = [{"id": f"copy-{i}", "text": rows[i]["text"] + extra} for i, extra in COPIES.items()]
    write_jsonl(root / "corpus" / "a.jsonl", rows[:30], BAD_LINES)
    write_jsonl(root / "corpus" / "b.jsonl", rows[30:] + copies)
    return root


def _config(root: Path, name: str, select: dict) -> dict:
    return {
        "input": {"path": str(root / "corpus"), "id_field": "id"},
        "output": {"path": str(root / name)},
        "embed": {"batch_size": 16, "max_tokens": 16},
        "scorers": [
            {"name": "loss", "model": tiny_lm(), "max_tokens": 16, "batch_size": 8},
            {"name": "el2n_lm", "model": tiny_lm(), "max_tokens": 16},
        ],
        "cluster": {"k": 3, "seed": 0},
        "select": {"budget": 0.5, "seed": 1, "score": "loss", **select},
        "work_dir": str(root / "work"),
    }


def _ledger(out: Path) -> dict[str, list[dict]]:
    rows = pq.read_table(out / "ledger").to_pylist()
    assert len(rows) == ROWS + len(COPIES) + len(BAD_LINES)  # every input row, once
    assert len({(r["source"], r["row"]) for r in rows}) == len(rows)
    assert sum(r["reason"].startswith("duplicate id (first at ") for r in rows) == 2
    assert sum(r["status"] == "quarantined" for r in rows) == len(BAD_LINES) + 2
    return rows


def _reference(config, result) -> tuple[Candidates, np.ndarray]:
    """The usable rows of the assigned shards as the in-memory path sees them (repeated ids quarantined)."""
    key = result.manifest["reuse"]["scores"]["key"]
    work = Path(config.work_dir) / key
    assigned = next(p for p in work.glob("assigned-*") if "-semdedup-" not in p.name and "-drop_noisy-" not in p.name)
    table = collect_rows(str(assigned))
    usable = np.flatnonzero(table.column("reason").to_numpy(zero_copy_only=False) == "")
    candidates = Candidates(
        ids=table.column("id").to_numpy(zero_copy_only=False)[usable],
        cluster=table.column("cluster").to_numpy()[usable],
        scores={s: table.column(s).to_numpy(zero_copy_only=False)[usable] for s in config.score_columns},
        context=RunContext(config, str(work / "scores"), str(work), []),
    )
    return candidates, usable


@pytest.fixture(scope="module")
def dedup_then_noisy(corpus, ray_cluster):
    """semdedup, drop_noisy and stratified in one run, with the driver refusing to hold even one row: a planned
    policy after the drop steps must never reach collect_rows."""
    select = {
        "policy": "stratified",
        "semdedup": {"threshold": 0.95},
        "drop_noisy": {"score": "el2n_lm", "fraction": 0.1},
    }
    config = parse_config(_config(corpus, "out-streamed", select))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "MAX_DRIVER_ROWS", 0)  # the in-memory path would refuse this run
        result = run(config)
    return config, result, _ledger(Path(config.output.path))


def test_semdedup_in_tasks_drops_what_the_in_memory_reference_drops(dedup_then_noisy):
    config, result, ledger = dedup_then_noisy
    candidates, _ = _reference(config, result)
    want = drop_near_duplicates(candidates, candidates.context, config.select)
    expected = {i: r for i, r, k in zip(candidates.ids, want.reasons, want.keep, strict=True) if not k}
    got = {r["id"]: r["reason"] for r in ledger if r["reason"].startswith("near-duplicate of ")}
    assert got == expected
    assert len(got) >= 4  # the planted copies were found (the exact ones at cos 1.00)
    assert all(r["status"] == "rejected" for r in ledger if r["id"] in got)
    info = result.manifest["selection"]["semdedup"]
    assert info["threshold"] == 0.95 and info["kept_by"] == "loss" and info["dropped"] == len(got)
    assert not info["reused"]
    per_cluster = Counter(r["cluster"] for r in ledger if r["id"] in got)
    assert info["dropped_per_cluster"] == dict(sorted(per_cluster.items()))


def test_drop_noisy_drops_the_noisiest_fraction_of_what_semdedup_left(dedup_then_noisy):
    config, result, ledger = dedup_then_noisy
    left = [r for r in ledger if r["status"] != "quarantined" and not r["reason"].startswith("near-duplicate")]
    noisy = {r["id"] for r in ledger if r["reason"].startswith("likely mislabelled: el2n_lm ")}
    want = int(np.floor(0.1 * len(left) + 0.5))
    ranked = sorted((r for r in left if r["el2n_lm"] == r["el2n_lm"]), key=lambda r: -r["el2n_lm"])
    assert noisy == {r["id"] for r in ranked[:want]} and len(noisy) == want
    for r in ledger:
        if r["id"] in noisy:
            assert r["status"] == "rejected"
            assert r["reason"] == f"likely mislabelled: el2n_lm {r['el2n_lm']:.3g}, among the noisiest 10%"
    info = result.manifest["selection"]["drop_noisy"]
    assert info["dropped"] == want and info["cut"] == pytest.approx(ranked[want - 1]["el2n_lm"])


def test_the_policy_sees_only_the_rows_the_steps_left(dedup_then_noisy):
    config, result, ledger = dedup_then_noisy
    usable = [r for r in ledger if r["status"] != "quarantined"]
    left = [r for r in usable if not r["reason"].startswith(("near-duplicate of ", "likely mislabelled: "))]
    selection = result.manifest["selection"]
    assert selection["usable_rows"] == len(left)
    assert result.counts["selected"] == selection["budget_rows"] == int(np.floor(0.5 * len(usable) + 0.5))
    # the in-memory stratified policy on the rows left picks the same rows
    ids = np.array(sorted(r["id"] for r in left), dtype=object)
    by_id = {r["id"]: r for r in left}
    candidates = Candidates(
        ids=ids,
        cluster=np.array([by_id[i]["cluster"] for i in ids]),
        scores={"loss": np.array([by_id[i]["loss"] for i in ids], dtype=np.float64)},
    )
    chosen = POLICIES["stratified"](config.select).select(candidates, selection["budget_rows"])
    assert set(ids[chosen.selected]) == {r["id"] for r in ledger if r["status"] == "selected"}
    assert pq.read_table(Path(config.output.path) / "selected").num_rows == result.counts["selected"]


def test_an_in_memory_policy_reads_the_same_drop_shards(corpus, ray_cluster, dedup_then_noisy):
    """mig (selected on the driver) after semdedup: the near-duplicates are the ones the streamed run dropped, from
    the same cached drop shards."""
    _, _, streamed = dedup_then_noisy
    config = parse_config(_config(corpus, "out-mig", {"policy": "mig", "semdedup": {"threshold": 0.95}}))
    result = run(config)
    ledger = _ledger(Path(config.output.path))
    near = lambda rows: {r["id"]: r["reason"] for r in rows if r["reason"].startswith("near-duplicate")}  # noqa: E731
    assert near(ledger) == near(streamed)
    usable = sum(r["status"] != "quarantined" for r in ledger)
    assert result.counts["selected"] == int(np.floor(0.5 * usable + 0.5))
    assert result.manifest["selection"]["semdedup"]["dropped"] == len(near(ledger))
    assert result.manifest["selection"]["semdedup"]["reused"]  # the streamed run's semdedup shards, same settings
    assert result.manifest["selection"]["usable_rows"] == usable - len(near(ledger))


def test_mig_refuses_more_rows_than_its_measured_limit_and_names_the_alternatives(corpus, dedup_then_noisy):
    import json
    import os
    import subprocess
    import sys

    config = corpus / "mig-limit.json"
    config.write_text(json.dumps(_config(corpus, "out-mig-limit", {"policy": "mig"})))
    env = {**os.environ, "RAYSEL_MAX_MIG_ROWS": "20"}
    proc = subprocess.run(
        [sys.executable, "-m", "raysel.cli", "run", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "policy 'mig' selects in memory on the driver (about 1.0 KB a row) and takes at most 20 rows" in err
    assert (
        "MIG inside each cluster is `stratified` by the same score" in err and "set RAYSEL_MAX_MIG_ROWS higher" in err
    )
    assert "Traceback" not in err and not (corpus / "out-mig-limit" / "_SUCCESS").exists()


@pytest.mark.parametrize("order", ["desc", "asc"])
@pytest.mark.parametrize("rule", [{"fraction": 0.1}, {"fraction": 0.37}, {"threshold": 0.8}])
def test_drop_noisy_cut_against_a_sort_in_memory(order, rule):
    """The step's cut over blocks (no Ray) drops exactly the rows a sort would: the noisiest by order, NaN never,
    ties in the score broken by the seeded id hash (as every cut)."""
    from raysel.select.cuts import id_hash
    from raysel.select.noisy import DropNoisy
    from raysel.select.plan import ArrayBlocks, CutService

    rng = np.random.default_rng(3)
    n = 1000
    values = np.round(rng.random(n), 2)  # many ties
    values[rng.choice(n, 50, replace=False)] = np.nan
    batch = {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "cluster": rng.integers(0, 4, n),
        "el2n": values,
    }
    config = parse_config(
        {
            "input": {"path": "/tmp/corpus.jsonl", "score_fields": ["el2n"]},
            "output": {"path": "/tmp/out"},
            "select": {
                "budget": 0.5,
                "policy": "random",
                "seed": 7,
                "drop_noisy": {"score": "el2n", "order": order, **rule},
            },
        }
    )
    drop = DropNoisy(config)
    step = drop.plan(CutService(ArrayBlocks(batch, blocks=5)), n)
    got = np.concatenate([drop.drops(b, step) for b in ArrayBlocks(batch, blocks=3).blocks])
    scored = np.flatnonzero(~np.isnan(values))
    noisier = -values[scored] if order == "desc" else values[scored]
    ranked = scored[np.lexsort((id_hash(batch["id"][scored], 7), noisier))]
    if "fraction" in rule:
        want = ranked[: int(np.floor(rule["fraction"] * n + 0.5))]
    else:
        want = scored[values[scored] >= 0.8] if order == "desc" else scored[values[scored] <= 0.8]
    assert set(np.flatnonzero(got)) == set(want.tolist()) and len(want) > 0
    assert not got[np.isnan(values)].any()
    reason = drop.reason(values[want[:1]])[0]
    assert reason.startswith(f"likely mislabelled: el2n {values[want[0]]:.3g}, ")
    assert reason.endswith("among the noisiest 10%" if rule == {"fraction": 0.1} else "")


@pytest.mark.parametrize(
    ("drop_noisy", "message"),
    [
        ({"score": "loss", "fraction": 0.1, "threshold": 2.0}, "select.drop_noisy: set exactly one of `fraction`"),
        ({"score": "loss"}, "select.drop_noisy: set exactly one of `fraction`"),
        ({"score": "aum", "fraction": 0.1}, "select.drop_noisy.score: 'aum' is not computed; add it to `scorers`"),
        ({"score": "loss", "fraction": 1.0}, "select.drop_noisy.fraction: Input should be less than 1"),
    ],
)
def test_drop_noisy_config_errors_name_the_field(drop_noisy, message):
    from raysel.errors import ConfigError

    config = {
        "input": {"path": "/tmp/corpus.jsonl"},
        "output": {"path": "/tmp/out"},
        "scorers": [{"name": "loss"}],
        "select": {"budget": 0.5, "policy": "random", "drop_noisy": drop_noisy},
    }
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(config)


def test_the_assigned_shards_are_keyed_by_the_scores_they_copy(tmp_path):
    """The assigned shards (and the drop shards keyed on them) copy the scores: rescored shards of other settings
    must not find an earlier run's assigned shards."""
    from raysel.pipeline import _assigned_uri

    paths = {"input": {"path": "/tmp/c.jsonl"}, "output": {"path": "/tmp/o"}, "work_dir": str(tmp_path)}
    config = parse_config({**paths, "select": {"budget": 0.5, "policy": "random"}})
    plain = _assigned_uri(config, "k1", f"{tmp_path}/k1/scores")
    a = _assigned_uri(config, "k1", f"{tmp_path}/k1/rescored-aaaa/scores")
    b = _assigned_uri(config, "k1", f"{tmp_path}/k1/rescored-bbbb/scores")
    assert len({plain, a, b}) == 3 and all(Path(u).parent == tmp_path / "k1" for u in (plain, a, b))
    assert Path(plain).name.startswith("assigned-") and Path(a).name.endswith("-aaaa")

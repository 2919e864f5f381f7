"""`raysel run` end to end, as a user runs it: a subprocess joined to the session's Ray cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import BAD_LINES, bbc_sample, write_jsonl

GOOD, BAD = 40, len(BAD_LINES)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("e2e")
    corpus = write_jsonl(root / "corpus.jsonl", bbc_sample(GOOD, seed=5), BAD_LINES)
    config = root / "run.yaml"
    config.write_text(
        f"input: {{path: {corpus}, id_field: id, label_field: topic}}\n"
        f"output: {{path: {root / 'out'}}}\n"
        "embed: {batch_size: 16, max_tokens: 32}\n"
        "scorers: [{name: entropy, max_tokens: 16, batch_size: 8}, {name: loss, max_tokens: 16, batch_size: 8}]\n"
        "cluster: {k: 3, seed: 0}\n"
        "select: {budget: 0.25, policy: stratified, score: entropy, seed: 0}\n"
        f"work_dir: {root / 'work'}\n"
    )
    return root, config


def raysel(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "raysel.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"raysel {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def ledger(out: Path):
    return pq.read_table(out / "ledger").to_pylist()


def selected_ids(out: Path):
    return sorted(pq.read_table(out / "selected").column("id").to_pylist())


def test_run_accounts_for_every_row(setup):
    root, config = setup
    proc = raysel("run", config)
    out = root / "out"
    assert (out / "_SUCCESS").exists() and "committed:" in proc.stdout
    rows = ledger(out)
    assert len(rows) == GOOD + BAD
    status = [r["status"] for r in rows]
    assert status.count("quarantined") == BAD and status.count("selected") == 10 and status.count("rejected") == 30
    assert all(r["reason"] for r in rows if r["status"] != "selected")
    assert all(r["reason"] == "" for r in rows if r["status"] == "selected")
    assert {r["cluster"] for r in rows if r["status"] == "quarantined"} == {-1}
    quarantined = {r["reason"].split(" (")[0].split(":")[0] for r in rows if r["status"] == "quarantined"}
    assert quarantined == {
        "malformed JSON",
        "empty text",
        "text is not a string",
        "undecodable bytes",
        "missing text field 'text'",
        "not a JSON object",
    }

    selected = pq.read_table(out / "selected")
    assert selected.num_rows == 10
    assert {"id", "text", "topic", "entropy", "loss", "cluster"} <= set(selected.column_names)
    assert sorted(selected.column("id").to_pylist()) == sorted(r["id"] for r in rows if r["status"] == "selected")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"selected": 10, "rejected": 30, "quarantined": BAD}
    assert manifest["input"]["rows"] == GOOD + BAD
    assert manifest["truncated"]["lm_cut"] > 0  # max_tokens 16 cuts these articles, and the ledger says so
    assert set(manifest["seconds"]) == {"score", "cluster", "select", "write"}
    assert manifest["reuse"]["scores"]["reused"] is False


def test_committed_output_is_refused_without_overwrite(setup):
    root, config = setup
    proc = raysel("run", config, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_same_seed_same_ids_and_only_select_changes_reuse_scores(setup):
    root, config = setup
    first = selected_ids(root / "out")
    raysel("run", config, "--overwrite")
    assert selected_ids(root / "out") == first
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["reuse"]["scores"]["reused"] is True and manifest["reuse"]["clusters"]["reused"] is True


def test_random_policy_depends_on_its_seed(setup):
    root, config = setup
    picks = []
    for seed in (0, 0, 1):
        out = root / f"random-{len(picks)}"
        raysel(
            "run",
            config,
            "--set",
            "select.policy=random",
            "--set",
            f"select.seed={seed}",
            "--set",
            f"output.path={out}",
        )
        picks.append(selected_ids(out))
    assert len(picks[0]) == 10
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_validate_reports_bad_fields(setup, tmp_path):
    _, config = setup
    assert raysel("validate", config).returncode == 0
    proc = raysel("validate", config, "--set", "select.budget=-3", "--set", "cluster.k=0", check=False)
    assert proc.returncode == 2
    assert "select.budget" in proc.stderr and "cluster.k" in proc.stderr

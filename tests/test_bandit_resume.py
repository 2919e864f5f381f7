"""A bandit run that stops (round limit) or is killed (SIGKILL mid-round) continues from its last saved round."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import tiny_lm

pytestmark = pytest.mark.slow


def _raw(corpus: Path, out: Path, work: Path, **params) -> dict:
    return {
        "input": {"path": str(corpus), "id_field": "id", "label_field": "topic"},
        "output": {"path": str(out)},
        "embed": {"max_tokens": 32},
        "scorers": [{"name": "entropy", "model": tiny_lm(), "max_tokens": 32}],
        "cluster": {"k": 4, "seed": 0},
        "work_dir": str(work),
        "select": {
            "budget": 0.25,
            "policy": "bandit",
            "score": "entropy",
            "seed": 3,
            "params": {
                "probe_scorer": {"name": "loss", "model": tiny_lm(), "max_tokens": 32, "batch_size": 4},
                "per_arm": 1,
                "arms_per_round": 2,
                "probe_budget": 1.0,
                **params,
            },
        },
    }


@pytest.fixture(scope="module")
def scored(ray_cluster, tmp_path_factory):
    """A corpus, a work dir whose pass 1 is done, and a straight 5-round bandit run on it to compare with."""
    from conftest import bbc_sample, write_jsonl

    from raysel.config import parse_config
    from raysel.pipeline import run

    root = tmp_path_factory.mktemp("bandit-resume")
    corpus = write_jsonl(root / "corpus.jsonl", bbc_sample(40, seed=4))
    straight = run(parse_config(_raw(corpus, root / "straight", root / "work", max_rounds=5)))
    return corpus, root / "work", straight.manifest["selection"]["bandit"], _selected(root / "straight")


def _copy_work(scored, dest: Path) -> Path:
    """The scored shards and centroids, without the bandit's saved rounds."""
    shutil.copytree(scored[1], dest, ignore=shutil.ignore_patterns("bandit-*"))
    return dest


def _selected(out: Path) -> list[str]:
    return sorted(pq.read_table(out / "selected", columns=["id"]).column("id").to_pylist())


def test_round_limit_then_continue_equals_a_straight_run(scored, tmp_path):
    from raysel.config import parse_config
    from raysel.pipeline import run

    corpus, _, straight, straight_selected = scored
    assert (straight["rounds"], straight["resumed_from_round"]) == (5, 0)
    work = _copy_work(scored, tmp_path / "work")
    first = run(parse_config(_raw(corpus, tmp_path / "a", work, max_rounds=2))).manifest["selection"]["bandit"]
    assert (first["rounds"], first["resumed_from_round"], first["rounds_this_run"]) == (2, 0, 2)
    saved = json.loads(Path(first["state"]).read_text())
    assert saved["round"] == 2 and len(saved["probed"]) == 4

    second = run(parse_config(_raw(corpus, tmp_path / "b", work, max_rounds=5))).manifest["selection"]["bandit"]
    assert second["state"] == first["state"]  # same corpus, clusters and bandit settings: the same saved state
    assert (second["rounds"], second["resumed_from_round"], second["rounds_this_run"]) == (5, 2, 3)
    assert second["reward_history"][:2] == first["reward_history"]
    # stopping after round 2 and continuing changed nothing: same rounds, same rewards, same subset
    assert second["reward_history"] == straight["reward_history"]
    assert _selected(tmp_path / "b") == straight_selected


def test_killed_run_continues_from_its_last_saved_round(scored, tmp_path):
    from raysel.config import parse_config
    from raysel.pipeline import run

    corpus = scored[0]
    work = _copy_work(scored, tmp_path / "work")
    raw = _raw(corpus, tmp_path / "out", work, max_rounds=12)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", "run", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),  # RAY_ADDRESS: the driver joins the session's cluster
        start_new_session=True,
    )
    state_files: list[Path] = []
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            state_files = list(work.glob("*/bandit-*/state.json"))
            if state_files and json.loads(state_files[0].read_text())["round"] >= 2:
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it spawned, mid-round
        proc.wait()
    assert state_files, "the bandit never saved a round before the deadline"
    at_kill = json.loads(state_files[0].read_text())
    assert 2 <= at_kill["round"] < 12, "the run was not killed mid-way"
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    result = run(parse_config(raw), resume=True)
    bandit = result.manifest["selection"]["bandit"]
    assert bandit["resumed_from_round"] == at_kill["round"]
    assert bandit["rounds"] == 12 and bandit["rounds_this_run"] == 12 - at_kill["round"]
    assert bandit["reward_history"][: at_kill["round"]] == at_kill["history"]
    state = json.loads(Path(bandit["state"]).read_text())
    assert state["probed"][: len(at_kill["probed"])] == at_kill["probed"]  # earlier probes kept, not redone
    assert len(set(state["probed"])) == len(state["probed"]) == sum(r["probed"] for r in bandit["reward_history"])
    assert (tmp_path / "out" / "_SUCCESS").exists()

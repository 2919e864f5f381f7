"""The bandit's plan/apply form (raysel/select/bandit/policy.py) on a real run, against its in-memory `select` on
the same shards: the same probes, the same counts per cluster, the exact budget, the same reasons; and the ledger
holds every input row once, bad lines and repeated ids included."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel.config import parse_config
from raysel.context import RunContext
from raysel.io import fs as rfs
from raysel.io.read import list_input
from raysel.pipeline import collect_rows, run, select_pass
from tests.conftest import BAD_LINES, bbc_sample, tiny_lm, write_jsonl

pytestmark = pytest.mark.slow

SETTINGS = {
    "nearest": {"pick": "nearest", "within": "probe", "allocate": "estimate"},
    "random": {"pick": "random", "within": "cheap", "allocate": "plays", "algorithm": "thompson"},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two files of real articles with bad lines and repeated ids (inside a file and across files)."""
    root = tmp_path_factory.mktemp("bandit-plan")
    rows = bbc_sample(48, seed=13, max_chars=200)
    rows[7]["id"] = rows[3]["id"]
    rows[40]["id"] = rows[2]["id"]
    write_jsonl(root / "corpus" / "a.jsonl", rows[:24], BAD_LINES)
    write_jsonl(root / "corpus" / "b.jsonl", rows[24:])
    return root


def _config(root: Path, name: str, params: dict) -> dict:
    return {
        "input": {"path": str(root / "corpus"), "id_field": "id"},
        "output": {"path": str(root / name)},
        "embed": {"batch_size": 16, "max_tokens": 16},
        "scorers": [{"name": "entropy", "model": tiny_lm(), "max_tokens": 16, "batch_size": 8}],
        "cluster": {"k": 4, "seed": 0},
        "select": {
            "budget": 0.3,
            "policy": "bandit",
            "score": "entropy",
            "seed": 2,
            "params": {
                "probe_scorer": {"name": "loss", "model": tiny_lm(), "max_tokens": 16, "batch_size": 4},
                "per_arm": 2,
                "arms_per_round": 2,
                "probe_budget": 0.25,
                **params,
            },
        },
        "work_dir": str(root / "work"),
    }


def _reference(config, result) -> tuple[list[dict], dict]:
    """The in-memory policy over the run's own assigned shards and pass-2 centroids: the slow reference."""
    key = result.manifest["reuse"]["scores"]["key"]
    base = Path(config.resolved_work_dir()) / key
    centroids = np.load(next(base.glob("centroids-*.npy")))
    scores_uri = result.manifest["reuse"]["scores"]["uri"]
    context = RunContext(config, scores_uri, rfs.join(str(base)), list_input(config.input), centroids)
    table, info = select_pass(config, collect_rows(str(next(base.glob("assigned-*")))), context)
    return table.to_pylist(), info


@pytest.mark.parametrize("name", SETTINGS)
def test_plan_apply_agrees_with_the_in_memory_bandit(corpus, ray_cluster, name):
    config = parse_config(_config(corpus, f"out-{name}", SETTINGS[name]))
    result = run(config)
    ledger = pq.read_table(Path(config.output.path) / "ledger").to_pylist()
    assert len(ledger) == 48 + len(BAD_LINES)  # every input row, once
    assert len({(r["source"], r["row"]) for r in ledger}) == len(ledger)
    assert sum(r["reason"].startswith("duplicate id (first at ") for r in ledger) == 2
    bandit = result.manifest["selection"]["bandit"]
    assert "passes" in result.manifest["selection"]  # planned: cuts found in passes over the rows, not in memory

    want, info = _reference(config, result)
    usable = sum(r["status"] != "quarantined" for r in ledger)
    assert result.counts["selected"] == info["budget_rows"] == round(0.3 * usable)  # the exact budget
    assert Counter(r["status"] for r in ledger) == Counter(r["status"] for r in want)
    # the same probes: rounds, rewards, rows
    assert bandit["reward_history"] == info["bandit"]["reward_history"]
    assert bandit["examples_probed"] == info["bandit"]["examples_probed"] > 0
    assert result.manifest["selection"]["quotas"] == info["quotas"]
    chosen = lambda rows: Counter(r["cluster"] for r in rows if r["status"] == "selected")  # noqa: E731
    assert chosen(ledger) == chosen(want) == Counter({int(c): q for c, q in info["quotas"].items() if q})
    assert {r["reason"] for r in ledger if r["status"] == "rejected"} == {
        r["reason"] for r in want if r["status"] == "rejected"
    }
    # the cheap score has no ties: the very same rows
    assert {r["id"] for r in ledger if r["status"] == "selected"} == {
        r["id"] for r in want if r["status"] == "selected"
    }
    if SETTINGS[name]["within"] == "probe":
        assert any(r["reason"].startswith("probed: loss ") for r in ledger)
    selected = pq.read_table(Path(config.output.path) / "selected")
    assert selected.num_rows == result.counts["selected"]


def test_the_bandit_probes_with_lm_influence_end_to_end(corpus, ray_cluster):
    """`probe_scorer: lm_influence` on the real SmolLM2 (its last block), Quad's preset with smaller rounds: the
    probe scores are the scorer's own values for the probed texts, computed in the probe's actors."""
    from raysel.config import ScorerConfig
    from raysel.scorers.lm_influence import LMInfluenceScorer

    rows = bbc_sample(48, seed=13, max_chars=200)
    target = corpus / "target.jsonl"
    write_jsonl(target, [r for r in bbc_sample(200, seed=1) if r["topic"] == "business"][:4])
    probe = {
        "name": "lm_influence",
        "max_tokens": 16,
        "batch_size": 4,
        "params": {"target": str(target), "dim": 256, "layers": {"last": 1}},
    }
    params = {"preset": "quad", "probe_scorer": probe, "max_rounds": 3}
    config = parse_config(_config(corpus, "out-lm-influence", params))
    bandit_params = config.select.typed_params()
    assert (bandit_params.alpha, bandit_params.radius, bandit_params.reward_scale) == (1e-4, 0.2, 1.0)  # Quad's
    assert (bandit_params.per_arm, bandit_params.arms_per_round) == (2, 2)  # given beside the preset: they win
    result = run(config)
    bandit = result.manifest["selection"]["bandit"]
    assert bandit["probe_scorer"] == "lm_influence" and bandit["rounds"] == 3
    assert bandit["reward_scale"] == 1.0  # Quad's reward: the mean score minus an offset, not a z-score
    assert bandit["examples_probed"] == bandit["probe_budget_rows"] == 11  # 4 + 4 + 3: floor(0.25 × 46 usable)
    probed = json.loads(Path(bandit["state"]).read_text())["probe_scores"]
    assert len(probed) == 11 and all(-1.0 <= s <= 1.0 for s in probed)  # cosines (LESS)

    # The scorer run directly on every text of the corpus: each probe score is one of those.
    scorer = LMInfluenceScorer(ScorerConfig(**probe), outputs=("lm_influence",))
    texts = np.array([r["text"] for r in rows], dtype=object)
    direct = scorer({"text": texts, "reason": np.array([""] * len(texts), dtype=object)})["lm_influence"]
    matched = [int(np.argmin(np.abs(direct - s))) for s in probed]
    assert np.allclose(direct[matched], probed, atol=1e-4)
    assert result.counts["selected"] == int(np.floor(0.3 * len(_usable(config)) + 0.5))


def _usable(config) -> list[dict]:
    ledger = pq.read_table(Path(config.output.path) / "ledger").to_pylist()
    return [r for r in ledger if r["status"] != "quarantined"]

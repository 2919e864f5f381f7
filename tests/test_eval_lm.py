"""raysel/eval_lm.py: the `lm` downstream of `raysel eval` (a small causal LM trained on each selection)."""

from __future__ import annotations

import json
import math
import random

import pyarrow.parquet as pq
import pytest
import yaml

from raysel.errors import ConfigError
from raysel.eval import parse_eval_config
from raysel.eval_lm import LMDownstream, SmallLM
from tests.conftest import bbc_sample, write_jsonl

TINY_LM = {"tokens": 4096, "lr": 1e-2, "seq_len": 32, "batch_size": 4, "hidden": 32, "layers": 1, "heads": 2}
TINY_LM |= {"vocab_size": 400, "tokenizer_rows": 40, "threads": 1}


def _by_topic(seed: int = 0) -> dict[str, list[str]]:
    from raysel.demo import bbc_articles

    articles = bbc_articles()
    random.Random(seed).shuffle(articles)
    out: dict[str, list[str]] = {}
    for a in articles:
        out.setdefault(a["topic"], []).append(a["text"][:1500])
    return out


def test_cli_eval_runs_the_lm_downstream_from_a_config(ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from raysel.cli import app

    rows = bbc_sample(40, seed=3)
    corpus = write_jsonl(tmp_path / "pool.jsonl", rows)
    taken = {r["id"] for r in rows}
    target = [r for r in bbc_sample(200, seed=4) if r["topic"] == "business" and r["id"] not in taken][:8]
    target_file = write_jsonl(tmp_path / "target.jsonl", target)
    raw = {
        "corpus": {"path": str(corpus), "label_field": "topic", "id_field": "id"},
        "test": {"fraction": 0.2, "seed": 0},
        "output": str(tmp_path / "eval"),
        "work_dir": str(tmp_path / "work"),
        "embed": {"max_tokens": 16},
        "scorers": [],
        "cluster": {"k": 2},
        "budgets": [0.5],
        "seeds": 1,
        "downstream": {"model": "lm", "lm": {**TINY_LM, "target": str(target_file)}},
    }
    config = tmp_path / "eval-lm.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["eval", str(config)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "eval" / "results.parquet").to_pylist()
    assert [r["policy"] for r in table] == ["random", "full"]
    vocab = json.loads(next((tmp_path / "work" / "eval-data").glob("lm-tokenizer-*.json")).read_text())
    uniform = math.log(len(vocab["model"]["vocab"]) + len(vocab["added_tokens"]) - 2)
    for r in table:
        # trained: both losses well below the uniform guess over the vocabulary
        assert 0 < r["target_loss"] < uniform - 0.5 and 0 < r["holdout_loss"] < uniform - 0.5, (r, uniform)
        assert r["tokens_per_s"] > 0
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "target loss (nats/token)" in md and "pool hold-out loss (nats/token)" in md
    assert (tmp_path / "eval" / "target_loss_vs_budget.png").stat().st_size > 1000


def test_a_selection_of_the_targets_domain_gives_a_lower_target_loss(tmp_path):
    """Same model, seed and token budget: business articles teach business better than sport, and vice versa."""
    topics = _by_topic()
    business, sports = topics["business"], topics["sports"]
    target, holdout = business[:20], sports[:20]
    config = LMDownstream(
        tokens=16_384,
        seq_len=64,
        batch_size=8,
        hidden=64,
        layers=1,
        heads=2,
        vocab_size=1000,
        tokenizer_rows=200,
        threads=1,
    )
    lm = SmallLM(config, business[20:120] + sports[20:120], target, holdout, tmp_path)
    on_business = lm.train_and_measure(business[20:80], seed=0)
    on_sports = lm.train_and_measure(sports[20:80], seed=0)
    assert on_business["train_tokens"] == on_sports["train_tokens"] == 16_384  # the same budget for both
    assert on_business["target_loss"] < on_sports["target_loss"] - 0.05, (on_business, on_sports)
    assert on_sports["holdout_loss"] < on_business["holdout_loss"] - 0.05, (on_business, on_sports)


def test_a_short_selection_is_repeated_to_the_token_budget(tmp_path):
    config = LMDownstream(tokens=4096, seq_len=32, batch_size=4, vocab_size=300, tokenizer_rows=10)
    lm = SmallLM(config, ["the cat sat on the mat"] * 10, ["a cat"], ["the mat"], tmp_path)
    rows = lm.packed_rows(["the cat sat", "on the mat"], seed=0)
    assert rows.shape == (128, 32)  # 4096 tokens from two short texts
    assert (rows == lm.eos).sum() >= 4096 // 12  # each pass over the selection ends its texts with EOS


def test_the_lm_downstream_needs_a_target(tmp_path):
    raw = {"corpus": {"path": "bbc", "label_field": "topic"}, "output": str(tmp_path), "downstream": {"model": "lm"}}
    with pytest.raises(ConfigError, match="downstream.lm.target: name the file of target texts"):
        parse_eval_config(raw)
    missing = raw | {"downstream": {"model": "lm", "lm": {"target": str(tmp_path / "nope.jsonl")}}}
    assert parse_eval_config(missing).downstream.lm.target.endswith("nope.jsonl")  # a missing file: at run time

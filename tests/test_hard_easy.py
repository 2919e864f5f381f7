"""The hard/easy mix: known answers on a small score vector."""

from __future__ import annotations

import numpy as np
import pytest

from raysel.config import SelectConfig
from raysel.select import POLICIES, Candidates
from raysel.select.hard_easy import HardEasyPolicy


def _candidates(values):
    n = len(values)
    return Candidates(
        ids=np.array([f"r{i:03d}" for i in range(n)], dtype=object),
        cluster=np.zeros(n, dtype=np.int32),
        scores={"loss": np.asarray(values, dtype=np.float64)},
    )


def _select(values, budget, order="desc", **params):
    cfg = SelectConfig(budget=budget, policy="hard_easy", score="loss", order=order, params=params)
    return HardEasyPolicy(cfg).select(_candidates(values), budget)


def test_registered():
    assert POLICIES["hard_easy"] is HardEasyPolicy


def test_ten_percent_hardest_ninety_percent_easiest():
    values = np.random.default_rng(0).permutation(100).astype(float)  # row i has score values[i]
    sel = _select(values, 20, hard_fraction=0.1)
    kept = np.sort(values[sel.selected])
    assert kept.tolist() == list(range(18)) + [98.0, 99.0]
    assert sel.info == {"hard": 2, "easy": 18, "hard_cut": 98.0, "easy_cut": 17.0}
    assert set(sel.reasons[~sel.selected]) == {"neither among the 2 hardest nor the 18 easiest by loss"}
    assert (sel.reasons[sel.selected] == "").all()


@pytest.mark.parametrize("fraction,hard", [(0.0, 0), (0.25, 5), (0.5, 10), (1.0, 20)])
def test_fractions(fraction, hard):
    values = np.arange(100, dtype=float)
    sel = _select(values, 20, hard_fraction=fraction)
    kept = values[sel.selected]
    assert sel.selected.sum() == 20
    assert (kept >= 100 - hard).sum() == hard and (kept < 20 - hard).sum() == 20 - hard


def test_order_asc_makes_low_scores_hard():
    values = np.arange(50, dtype=float)
    sel = _select(values, 10, order="asc", hard_fraction=0.2)
    assert sorted(values[sel.selected].tolist()) == [0.0, 1.0] + list(range(42, 50))


def test_random_easy_part_is_seeded_and_avoids_the_hard_rows():
    values = np.arange(100, dtype=float)
    a = _select(values, 20, hard_fraction=0.1, easy="random")
    b = _select(values, 20, hard_fraction=0.1, easy="random")
    assert np.array_equal(a.selected, b.selected) and a.selected.sum() == 20
    assert a.selected[[98, 99]].all()
    assert not np.array_equal(np.flatnonzero(a.selected)[:18], np.arange(18))  # not simply the easiest


def test_unscored_rows_come_last():
    values = np.array([np.nan, 5.0, 1.0, np.nan, 3.0, 9.0])
    sel = _select(values, 4, hard_fraction=0.25)  # 1 hard (9.0) + 3 easy (1.0, 3.0, 5.0)
    assert sel.selected.tolist() == [False, True, True, False, True, True]
    sel = _select(values, 5, hard_fraction=0.2)  # 4 easy: the 3 scored, then the first unscored by id
    assert sel.selected.tolist() == [True, True, True, False, True, True]


@pytest.mark.slow
def test_hard_easy_through_the_pipeline(ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    from conftest import bbc_sample, tiny_lm, write_jsonl

    from raysel.config import parse_config
    from raysel.pipeline import run

    corpus = write_jsonl(tmp_path / "corpus.jsonl", bbc_sample(20, seed=2))
    result = run(
        parse_config(
            {
                "input": {"path": str(corpus), "id_field": "id"},
                "output": {"path": str(tmp_path / "out")},
                "embed": {"max_tokens": 32},
                "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 32}],
                "cluster": {"k": 2},
                "work_dir": str(tmp_path / "work"),
                "select": {"budget": 10, "policy": "hard_easy", "score": "loss", "params": {"hard_fraction": 0.2}},
            }
        )
    )
    assert result.manifest["selection"]["hard"] == 2 and result.manifest["selection"]["easy"] == 8
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pandas().sort_values("loss")
    assert ledger.status.tolist() == ["selected"] * 8 + ["rejected"] * 10 + ["selected"] * 2  # 20 rows by loss

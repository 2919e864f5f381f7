"""Exact cuts by radix refinement (raysel/cuts.py) against a plain sort, over blocks in any order."""

from __future__ import annotations

import numpy as np
import pytest

from raysel.select.cuts import CutFinder, cut_score, decide, float_key, float_of_key, histogram, id_hash


def _find(groups, k1, k2, quotas, blocks=7, seed=0):
    sizes = {int(g): int(n) for g, n in zip(*np.unique(groups, return_counts=True), strict=True)}
    finder = CutFinder(quotas, sizes)
    order = np.random.default_rng(seed).permutation(len(groups))  # the rows arrive in any order, any blocks
    while not finder.done:
        request = finder.request()
        finder.update([histogram(groups[b], k1[b], k2[b], request) for b in np.array_split(order, blocks)])
    return finder


def _reference(groups, k1, k2, quotas):
    keep = np.zeros(len(groups), dtype=bool)
    for g, q in quotas.items():
        rows = np.flatnonzero(groups == g)
        keep[rows[np.lexsort((k2[rows], k1[rows]))[:q]]] = True
    return keep


@pytest.mark.parametrize("kind", ["continuous", "ties", "nan", "constant"])
def test_cuts_keep_exactly_what_a_sort_keeps(kind):
    rng = np.random.default_rng(1)
    n = 20_000
    values = {
        "continuous": rng.normal(3.0, 1.0, n),
        "ties": rng.integers(0, 5, n).astype(float),
        "nan": np.where(rng.random(n) < 0.3, np.nan, rng.random(n)),
        "constant": np.zeros(n),
    }[kind]
    groups = rng.integers(0, 40, n)
    k1 = float_key(values, "desc")
    k2 = id_hash(np.arange(n).astype(str), seed=3)
    quotas = {g: int(rng.integers(0, 700)) for g in range(40)}
    finder = _find(groups, k1, k2, quotas)
    keep = decide(groups, k1, k2, finder.cuts)
    assert np.array_equal(keep, _reference(groups, k1, k2, quotas))
    assert finder.passes <= 6


def test_the_same_cut_whatever_the_blocks_and_their_order():
    rng = np.random.default_rng(2)
    values, groups = rng.random(5000), np.zeros(5000, np.int64)
    k1, k2 = float_key(values, "asc"), id_hash(np.arange(5000).astype(str), seed=0)
    cuts = [_find(groups, k1, k2, {0: 1234}, blocks=b, seed=s).cuts for b, s in ((1, 0), (13, 1), (97, 2))]
    assert cuts[0] == cuts[1] == cuts[2]


def test_keys_rank_scores_with_unscored_last_and_invert():
    values = np.array([0.5, -2.0, np.nan, 3.0, -0.0, 0.0])
    desc = float_key(values, "desc")
    assert np.argsort(desc, kind="stable").tolist() == [3, 0, 4, 5, 1, 2]
    assert np.argsort(float_key(values, "asc"), kind="stable").tolist() == [1, 4, 5, 0, 3, 2]
    assert [float_of_key(int(k), "desc") for k in desc[[0, 1, 3]]] == [0.5, -2.0, 3.0]


def test_budgets_of_nothing_and_everything_need_no_pass():
    finder = CutFinder({0: 0, 1: 5}, {0: 3, 1: 5})
    assert finder.done
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    k = np.arange(8, dtype=np.uint64)
    assert decide(groups, k, k, finder.cuts).tolist() == [False] * 3 + [True] * 5


def test_the_score_at_a_cut():
    values = np.linspace(0, 1, 3000)
    groups = np.zeros(3000, np.int64)
    k1, k2 = float_key(values, "desc"), id_hash(np.arange(3000).astype(str), 0)
    finder = _find(groups, k1, k2, {0: 1000})
    assert cut_score(finder.cuts[0], "desc") == pytest.approx(np.sort(values)[::-1][999])

import numpy as np
import pytest

from raysel.config import SelectConfig
from raysel.select import POLICIES, Candidates, budget_rows, largest_remainder, rank


def _candidates(n=100, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return Candidates(
        ids=np.array([f"id{i:04d}" for i in range(n)], dtype=object),
        cluster=rng.integers(0, k, n).astype(np.int32),
        scores={"s": rng.normal(size=n)},
    )


def test_budget_rows():
    assert budget_rows(0.25, 10) == 3  # 2.5 rounds half up
    assert budget_rows(0.5, 21) == 11
    assert budget_rows(0.3, 10) == 3
    assert budget_rows(1.0, 7) == 7
    assert budget_rows(50, 7) == 7
    assert budget_rows(3, 7) == 3


def test_rank_puts_nan_last_and_keeps_id_order_for_ties():
    v = np.array([1.0, np.nan, 3.0, 3.0, 0.5])
    assert rank(v, "desc").tolist() == [2, 3, 0, 4, 1]
    assert rank(v, "asc").tolist() == [4, 0, 2, 3, 1]


@pytest.mark.parametrize("total", [0, 1, 7, 50, 99, 100])
def test_largest_remainder_sums_and_respects_caps(total):
    weights = np.array([50, 30, 15, 5])
    caps = np.array([50, 30, 15, 5])
    q = largest_remainder(weights, total, caps)
    assert q.sum() == total and (q <= caps).all() and (q >= 0).all()
    # proportional within one row of the exact share
    assert np.all(np.abs(q - total * weights / weights.sum()) < 1 + 1e-9)


def test_largest_remainder_passes_on_what_a_capped_cluster_cannot_take():
    q = largest_remainder(np.array([10, 10]), 15, caps=np.array([2, 100]))
    assert q.tolist() == [2, 13]


@pytest.mark.parametrize("policy", ["random", "topk", "stratified"])
@pytest.mark.parametrize("budget", [1, 10, 37, 100])
def test_policies_select_exactly_the_budget(policy, budget):
    cand = _candidates()
    sel = POLICIES[policy](SelectConfig(budget=budget, policy=policy, score="s")).select(cand, budget)
    assert sel.selected.sum() == budget
    assert all(r == "" for r in sel.reasons[sel.selected])
    assert all(r for r in sel.reasons[~sel.selected])


def test_topk_keeps_the_best_scores():
    cand = _candidates()
    sel = POLICIES["topk"](SelectConfig(budget=10, policy="topk", score="s")).select(cand, 10)
    assert set(np.flatnonzero(sel.selected)) == set(np.argsort(-cand.scores["s"])[:10])
    sel = POLICIES["topk"](SelectConfig(budget=10, policy="topk", score="s", order="asc")).select(cand, 10)
    assert set(np.flatnonzero(sel.selected)) == set(np.argsort(cand.scores["s"])[:10])


def test_stratified_is_proportional_and_top_inside_each_cluster():
    cand = _candidates(n=200, k=5)
    sel = POLICIES["stratified"](SelectConfig(budget=40, policy="stratified", score="s")).select(cand, 40)
    for c in range(5):
        members = np.flatnonzero(cand.cluster == c)
        quota = sel.info["quotas"][c]
        assert abs(quota - 40 * len(members) / 200) < 1
        best = members[np.argsort(-cand.scores["s"][members])[:quota]]
        assert set(best) == set(np.flatnonzero(sel.selected & (cand.cluster == c)))


def test_threshold_keeps_passing_rows_up_to_the_budget():
    cand = _candidates()
    cfg = SelectConfig(budget=1000, policy="threshold", score="s", threshold=0.5)
    sel = POLICIES["threshold"](cfg).select(cand, 100)
    assert set(np.flatnonzero(sel.selected)) == set(np.flatnonzero(cand.scores["s"] >= 0.5))
    sel = POLICIES["threshold"](cfg).select(cand, 3)
    assert sel.selected.sum() == 3 and "passed the threshold, over the budget" in set(sel.reasons)


def test_random_is_seeded():
    cand = _candidates()
    pick = lambda seed: POLICIES["random"](SelectConfig(budget=10, policy="random", seed=seed)).select(cand, 10)  # noqa: E731
    assert (pick(0).selected == pick(0).selected).all()
    assert (pick(0).selected != pick(1).selected).any()

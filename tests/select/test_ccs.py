"""`ccs` (raysel/select/ccs.py) and class-balanced budgets (`balance: label`): plan/apply over blocks against the
in-memory `select`, which sorts; and what CCS promises: the β hardest pruned, the strata filled evenly."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raysel.config import SelectConfig
from raysel.select import POLICIES, Candidates, budget_rows
from raysel.select.ccs import fill_smallest_first
from raysel.select.plan import ArrayBlocks, CutService, SelectionStats, Strata

N = 2000


def _candidates(ties: bool = False, nan: bool = False, seed: int = 5) -> Candidates:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, N).astype(float) if ties else rng.gamma(2.0, 1.0, N)
    if nan:
        values[rng.random(N) < 0.1] = np.nan
    ids = np.array(sorted(f"id-{i:05d}" for i in range(N)), dtype=object)
    labels = rng.choice(np.array(["a", "b", "c", "d"], dtype=object), N, p=[0.55, 0.25, 0.15, 0.05])
    return Candidates(ids=ids, cluster=rng.integers(0, 9, N), scores={"aum": values}, labels=labels)


def _stats(c: Candidates) -> SelectionStats:
    clusters, sizes = np.unique(c.cluster, return_counts=True)
    return SelectionStats(
        len(c), dict(zip(clusters.tolist(), sizes.tolist(), strict=True)), label_sizes=dict(Counter(c.labels))
    )


def _streamed(policy, c: Candidates, budget: int):
    batch = {"id": c.ids, "cluster": c.cluster, "label": c.labels, **c.scores}
    cuts = CutService(ArrayBlocks(batch, blocks=5))
    plan = policy.plan(_stats(c), budget, cuts)
    keep, why = np.zeros(N, dtype=bool), np.empty(N, dtype=object)
    for idx in np.array_split(np.random.default_rng(1).permutation(N), 7):  # apply block by block, any order
        keep[idx], why[idx] = policy.apply({k: v[idx] for k, v in batch.items()}, plan)
    return keep, why, plan, cuts.passes


SETTINGS = [
    {"policy": "ccs", "score": "aum", "params": {"beta": 0.1, "strata": 10}},
    {"policy": "ccs", "score": "aum", "params": {"beta": 0.3, "strata": 50, "balance": "cluster"}},
    {"policy": "ccs", "score": "aum", "order": "asc", "params": {"beta": 0.2, "strata": 7, "balance": "label"}},
    {"policy": "stratified", "score": "aum", "params": {"balance": "label"}},
]


@pytest.mark.parametrize("ties,nan", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("budget", [0.02, 0.25, 0.85])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['policy']}-{s.get('params', {})}")
def test_plan_apply_gives_the_rows_and_reasons_of_select(settings, budget, ties, nan):
    config = SelectConfig(budget=budget, seed=3, **settings)
    policy = POLICIES[config.policy](config)
    c = _candidates(ties, nan)
    rows = budget_rows(budget, N)
    reference = policy.select(c, rows)
    keep, why, plan, passes = _streamed(policy, c, rows)
    assert keep.sum() == rows == reference.selected.sum()  # the exact budget
    if config.policy == "ccs" or not ties:  # ccs's reference breaks ties by the same seeded hash; stratified's by id
        assert np.array_equal(keep, reference.selected)
        assert np.array_equal(why, reference.reasons)
    assert set(why[~keep]) == set(reference.reasons[~reference.selected])
    assert (why[keep] == "").all() and (why[~keep] != "").all()
    assert plan.info == reference.info
    if config.params.get("balance") == "label":  # class-proportional: each label's share of the budget
        share = Counter(c.labels[keep])
        for i, label in enumerate(sorted(set(c.labels))):
            assert share[label] == plan.info["quotas"][i]
            assert abs(share[label] - rows * np.sum(c.labels == label) / N) <= 2
    assert passes <= 20


def test_the_same_seed_gives_the_same_rows_and_another_seed_others():
    c = _candidates()
    pick = {
        s: POLICIES["ccs"](SelectConfig(budget=0.2, policy="ccs", score="aum", seed=s)).select(c, 400).selected
        for s in (0, 0, 1)
    }
    again = POLICIES["ccs"](SelectConfig(budget=0.2, policy="ccs", score="aum", seed=0)).select(c, 400).selected
    assert np.array_equal(pick[0], again) and not np.array_equal(pick[0], pick[1])


def test_ccs_prunes_the_hardest_beta_and_covers_the_score_range_evenly():
    c = _candidates()
    config = SelectConfig(budget=1000, policy="ccs", score="aum", params={"beta": 0.1, "strata": 10})
    sel = POLICIES["ccs"](config).select(c, 1000)
    values = c.scores["aum"]
    pruned = np.array(["pruned" in r for r in sel.reasons])
    assert pruned.sum() == 200 and values[pruned].min() >= values[~pruned].max()  # the 10 % highest aum
    assert not (sel.selected & pruned).any()
    rest = values[~pruned]
    strata = Strata("aum", 10, {0: rest.min()}, {0: rest.max()})
    per = np.bincount(strata.of(values[sel.selected], np.zeros(1000, dtype=int)), minlength=10)
    avail = np.bincount(strata.of(rest, np.zeros(len(rest), dtype=int)), minlength=10)
    full = per == avail  # strata smaller than their share are taken whole; the others get equal shares
    assert full.any() and (per[~full].max() - per[~full].min() <= 1)
    # a score-ranked selection would take one end; CCS reaches both ends of what is left
    assert values[sel.selected].min() == rest.min() and per[-1] > 0


def test_fill_smallest_first_is_the_papers_algorithm():
    assert fill_smallest_first([1, 4, 4], 8) == [1, 3, 4]
    assert fill_smallest_first([10, 2, 30, 5], 20) == [6, 2, 7, 5]
    assert fill_smallest_first([3, 3], 100) == [3, 3]
    assert fill_smallest_first([0, 0, 7], 3) == [0, 0, 3]
    rng = np.random.default_rng(0)
    for _ in range(200):  # the budget is met exactly whenever it fits
        sizes = rng.integers(0, 30, rng.integers(1, 12)).tolist()
        budget = int(rng.integers(0, sum(sizes) + 1))
        take = fill_smallest_first(sizes, budget)
        assert sum(take) == budget and all(0 <= t <= s for t, s in zip(take, sizes, strict=True))


def test_balance_label_without_a_label_column_says_what_to_set():
    c = _candidates()
    c.labels = None
    with pytest.raises(ValueError, match="input.label_field"):
        POLICIES["stratified"](SelectConfig(budget=0.1, score="aum", params={"balance": "label"})).select(c, 10)

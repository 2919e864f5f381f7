"""Each policy's plan/apply form (raysel/select/plan.py), over blocks, against its in-memory `select`: the same
counts per cluster, the exact budget, the same reasons; the same rows where scores have no ties."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from raysel.config import SelectConfig
from raysel.select import POLICIES, Candidates, budget_rows
from raysel.select.plan import ArrayBlocks, CutService, SelectionStats

N = 3000


def _candidates(ties: bool, nan: bool) -> Candidates:
    rng = np.random.default_rng(5)
    values = rng.integers(0, 4, N).astype(float) if ties else rng.normal(0, 1, N)
    if nan:
        values[rng.random(N) < 0.2] = np.nan
    ids = np.array(sorted(f"id-{i:05d}" for i in range(N)), dtype=object)
    return Candidates(ids=ids, cluster=rng.integers(0, 12, N), scores={"loss": values})


def _streamed(policy, candidates: Candidates, budget: int):
    batch = {"id": candidates.ids, "cluster": candidates.cluster, **candidates.scores}
    clusters, sizes = np.unique(candidates.cluster, return_counts=True)
    stats = SelectionStats(len(candidates), dict(zip(clusters.tolist(), sizes.tolist(), strict=True)))
    plan = policy.plan(stats, budget, CutService(ArrayBlocks(batch, blocks=5)))
    kept, reasons = [], []
    for idx in np.array_split(np.random.default_rng(0).permutation(N), 7):  # apply block by block, any order
        k, r = policy.apply({c: v[idx] for c, v in batch.items()}, plan)
        kept.append((idx, k))
        reasons.append((idx, r))
    keep = np.zeros(N, dtype=bool)
    why = np.empty(N, dtype=object)
    for (idx, k), (_, r) in zip(kept, reasons, strict=True):
        keep[idx], why[idx] = k, r
    return keep, why, plan


SETTINGS = [
    {"policy": "random"},
    {"policy": "topk", "score": "loss"},
    {"policy": "topk", "score": "loss", "order": "asc"},
    {"policy": "threshold", "score": "loss", "threshold": 0.3},
    {"policy": "stratified", "score": "loss"},
    {"policy": "hard_easy", "score": "loss", "params": {"hard_fraction": 0.1}},
    {"policy": "hard_easy", "score": "loss", "params": {"hard_fraction": 0.3, "easy": "random"}},
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("budget", [0.02, 0.3, 0.9])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_plan_apply_matches_the_in_memory_policy(settings, budget, ties, nan):
    config = SelectConfig(budget=budget, seed=3, **settings)
    policy = POLICIES[config.policy](config)
    candidates = _candidates(ties, nan)
    rows = budget_rows(budget, N)
    reference = policy.select(candidates, rows)
    keep, why, plan = _streamed(policy, candidates, rows)
    assert keep.sum() == reference.selected.sum()  # the exact budget (or what passes the threshold)
    if config.policy == "stratified":
        assert Counter(candidates.cluster[keep]) == Counter(candidates.cluster[reference.selected])
    assert set(why[~keep]) == set(reference.reasons[~reference.selected])  # the same reasons, cut values included
    assert (why[keep] == "").all()
    exact = config.policy != "random" and settings.get("params", {}).get("easy") != "random" and not ties
    if exact and not nan:
        assert np.array_equal(keep, reference.selected)
    if config.policy in ("topk", "threshold", "hard_easy") and config.params.get("easy") != "random":
        assert plan.info.keys() == reference.info.keys() or config.policy == "threshold"

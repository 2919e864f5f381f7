"""The `ccs` policy: Coverage-centric Coreset Selection (Zheng et al., ICLR 2023, arXiv 2210.15809).

Score-ranked selection keeps only one end of the difficulty range and, at high pruning rates, does worse than
random: it loses coverage of the data. CCS keeps the whole range:

1. prune the hardest β of the rows by the difficulty score `select.score` (the high end with `order: desc`:
   an el2n, an aum; these are the rows most likely mislabelled);
2. split the rest into `strata` equal-width strata of the score's range;
3. spread the budget evenly over the strata, filling from the smallest: the smallest stratum gets
   min(its size, budget left / strata left), then the next, until the budget is spent (Algorithm 1);
4. inside a stratum, a seeded random draw (the hash of the id).

`balance: cluster` or `balance: label` runs the same inside each cluster or label, with budgets (and β)
proportional to their sizes: the cluster- and class-proportional variants (arXiv 2507.10904). β shrinks
where the budget would not fit in what is left (β·n ≤ n − budget), so the budget is always met exactly.
Unscored rows (NaN) are never pruned and form a stratum of their own.

Planned in four passes over the candidate columns at most plus the cuts' refinement: the β cut per group,
the score range of what is left per group, the rows per stratum, the draw per stratum.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.select import (
    Candidates,
    Policy,
    Selection,
    candidate_groups,
    group_name,
    proportional_quotas,
    register_policy,
)
from raysel.select.cuts import float_key, id_hash
from raysel.select.plan import CutService, Eligible, Plan, SelectionStats, Strata


class CCSParams(BaseModel):
    """Settings of the `ccs` policy (`select.params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    beta: float = Field(0.1, ge=0, lt=1, description="share of the hardest rows pruned first (likely mislabelled)")
    strata: int = Field(50, ge=1, description="equal-width strata of the score's range (the paper's k = 50)")
    balance: Literal["all", "cluster", "label"] = Field(
        "all", description="one CCS over the corpus, or one per cluster / per label with proportional budgets"
    )


def pruned_count(size: int, quota: int, beta: float) -> int:
    """Rows of a group pruned as the hardest: round(β·size), at most what leaves room for the group's quota."""
    return max(0, min(int(np.floor(beta * size + 0.5)), size - quota))


def fill_smallest_first(sizes: list[int], budget: int) -> list[int]:
    """CCS's budget over strata (Algorithm 1 of arXiv 2210.15809): the smallest stratum first gets
    min(size, budget left // strata left); ties by stratum index. Any rounding remainder (none when the budget
    fits) goes to strata with room, largest first."""
    take = [0] * len(sizes)
    left = min(budget, sum(sizes))
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    for pos, i in enumerate(order):
        take[i] = min(sizes[i], left // (len(order) - pos))
        left -= take[i]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        extra = min(sizes[i] - take[i], left)
        take[i] += extra
        left -= extra
    return take


def stratum_quotas(counts: dict[int, int], quotas: dict[int, int], bins: int) -> dict[int, int]:
    """Per stratified group id (base × (bins + 1) + stratum), its share of its base group's quota."""
    out: dict[int, int] = {}
    for base, q in quotas.items():
        ids = [base * (bins + 1) + s for s in range(bins + 1)]
        for g, t in zip(ids, fill_smallest_first([counts.get(g, 0) for g in ids], q), strict=True):
            if t:
                out[g] = t
    return out


@register_policy("ccs")
class CCSPolicy(Policy):
    """Coverage-centric coreset selection (see the module docstring).

    Example:
        >>> cfg = SelectConfig(budget=0.25, policy="ccs", score="aum", params={"beta": 0.2, "balance": "label"})
        >>> CCSPolicy(cfg).select(candidates, 250)     # doctest: +SKIP
    """

    Params = CCSParams

    def select(self, candidates: Candidates, budget: int) -> Selection:
        """The in-memory reference: the same rows as plan/apply, by sorting."""
        p: CCSParams = self.config.typed_params()
        score, order, seed = self.config.score, self.config.order, self.config.seed
        values = np.asarray(candidates.scores[score], dtype=np.float64)
        groups, labels = candidate_groups(candidates, p.balance)
        hashes = id_hash(candidates.ids, seed)
        ids, counts = np.unique(groups, return_counts=True)
        sizes = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        quotas = proportional_quotas(sizes, budget)
        pruned = np.zeros(len(candidates), dtype=bool)
        strata = np.full(len(candidates), p.strata, dtype=np.int64)
        selected = np.zeros(len(candidates), dtype=bool)
        for g in ids.tolist():
            members = np.flatnonzero(groups == g)
            hardest = members[np.lexsort((hashes[members], float_key(values[members], order)))]
            pruned[hardest[: pruned_count(sizes[g], quotas[g], p.beta)]] = True
            rest = members[~pruned[members]]
            scored = rest[~np.isnan(values[rest])]
            if len(scored):
                lo, hi = values[scored].min(), values[scored].max()
                strata[rest] = Strata(score, p.strata, {g: lo}, {g: hi}).of(values[rest], np.full(len(rest), g))
            per_stratum = [np.flatnonzero(strata[rest] == s) for s in range(p.strata + 1)]
            takes = fill_smallest_first([len(m) for m in per_stratum], quotas[g])
            for m, t in zip(per_stratum, takes, strict=True):
                drawn = rest[m][np.argsort(hashes[rest[m]], kind="stable")]
                selected[drawn[:t]] = True
        reasons = _reasons(selected, pruned, groups, strata, p, score, labels)
        return Selection(
            selected, reasons, {"pruned": int(pruned.sum()), "quotas": {int(g): q for g, q in quotas.items()}}
        )

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        p: CCSParams = self.config.typed_params()
        sizes = stats.group_sizes(p.balance)
        quotas = proportional_quotas(sizes, budget)
        labels = stats.labels if p.balance == "label" else ()
        prune = self._step(0, group_by=p.balance, labels=labels)
        prune = replace(prune, quotas={g: pruned_count(n, quotas[g], p.beta) for g, n in sizes.items()})
        prune = cuts.find(prune, [], sizes)
        rest = self._step(0, score=None, group_by=p.balance, labels=labels, eligible=Eligible(not_kept_by=(0,)))
        ranges = cuts.score_range(rest, [prune], self.config.score)
        strata = Strata(
            self.config.score,
            p.strata,
            {g: lo for g, (lo, _) in ranges.items()},
            {g: hi for g, (_, hi) in ranges.items()},
        )
        draw = replace(rest, strata=strata)
        counts = cuts.count(draw, [prune])
        draw = cuts.find(replace(draw, quotas=stratum_quotas(counts, quotas, p.strata)), [prune], counts)
        info = {"pruned": int(sum(prune.quotas.values())), "quotas": {int(g): q for g, q in quotas.items()}}
        return Plan((prune, draw), info)

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        p: CCSParams = self.config.typed_params()
        pruned, kept = plan.kept(batch)
        draw = plan.steps[1]
        groups = plan.steps[0].groups(batch)
        strata = draw.strata.of(batch[self.config.score], groups)
        return kept, _reasons(kept, pruned, groups, strata, p, self.config.score, draw.labels)


def _reasons(selected, pruned, groups, strata, p: CCSParams, score: str, labels) -> np.ndarray:
    where = [group_name(p.balance, int(g), labels) for g in groups] if p.balance != "all" else None
    out = np.empty(len(selected), dtype=object)
    for i in range(len(selected)):
        at = f" of {where[i]}" if where else ""
        if selected[i]:
            out[i] = ""
        elif pruned[i]:
            out[i] = f"pruned among the hardest {100 * p.beta:g} %{at} by {score} (likely mislabelled)"
        elif strata[i] == p.strata:
            out[i] = f"not drawn from the unscored rows{at} (no {score})"
        else:
            out[i] = f"not drawn from stratum {int(strata[i]) + 1}/{p.strata}{at} of {score}"
    return out

"""The simple policies: random, topk, threshold and stratified (each with its in-memory and streaming form)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.registry import register_policy
from raysel.select.base import (
    Balance,
    Candidates,
    Policy,
    Selection,
    candidate_groups,
    group_name,
    proportional_quotas,
    rank,
    take_within_clusters,
)
from raysel.select.plan import CutService, Eligible, Plan, SelectionStats


def _unscored(values: np.ndarray, reasons: np.ndarray, kept: np.ndarray, score: str, text: str) -> np.ndarray:
    return np.where(~kept & np.isnan(values), text.format(score=score), reasons)


@register_policy("random")
class RandomPolicy(Policy):
    """A seeded uniform sample of `budget` rows: the baseline every other policy must beat."""

    needs_score = False

    def select(self, candidates: Candidates, budget: int) -> Selection:
        rng = np.random.default_rng(self.config.seed)
        selected = np.zeros(len(candidates), dtype=bool)
        selected[rng.choice(len(candidates), size=budget, replace=False)] = True
        reasons = np.where(selected, "", "not drawn by the random sample").astype(object)
        return Selection(selected, reasons)

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        step = self._step(budget, score=None)  # ranked by the seeded hash of the id alone
        return Plan((cuts.find(step, [], {0: stats.usable}),))

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        (kept,) = plan.kept(batch)
        return kept, np.where(kept, "", "not drawn by the random sample").astype(object)


@register_policy("topk")
class TopKPolicy(Policy):
    """The `budget` best rows by `score` over the whole corpus (`order: desc` keeps the highest)."""

    def select(self, candidates: Candidates, budget: int) -> Selection:
        values = candidates.scores[self.config.score]
        best = rank(values, self.config.order)
        selected = np.zeros(len(candidates), dtype=bool)
        selected[best[:budget]] = True
        cut = values[best[budget - 1]] if budget else float("nan")
        reasons = np.where(selected, "", f"outside the top {budget} by {self.config.score} (cut {cut:.4g})")
        reasons = np.where(~selected & np.isnan(values), f"unscored by {self.config.score}, ranked last", reasons)
        return Selection(selected, reasons.astype(object), {"cut": float(cut) if np.isfinite(cut) else None})

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        step = cuts.find(self._step(budget), [], {0: stats.usable})
        cut = step.cut_value()
        return Plan((step,), {"cut": cut if np.isfinite(cut) else None})

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        (kept,) = plan.kept(batch)
        budget, cut, score = plan.steps[0].quotas[0], plan.steps[0].cut_value(), self.config.score
        reasons = np.where(kept, "", f"outside the top {budget} by {score} (cut {cut:.4g})")
        values = np.asarray(batch[score], dtype=np.float64)
        return kept, _unscored(values, reasons, kept, score, "unscored by {score}, ranked last").astype(object)


@register_policy("threshold")
class ThresholdPolicy(Policy):
    """Rows whose score is >= threshold (desc) or <= threshold (asc); the best first if more than the budget."""

    def select(self, candidates: Candidates, budget: int) -> Selection:
        values = candidates.scores[self.config.score]
        thr = self.config.threshold
        passing = (values >= thr) if self.config.order == "desc" else (values <= thr)
        best = [i for i in rank(values, self.config.order) if passing[i]][:budget]
        selected = np.zeros(len(candidates), dtype=bool)
        selected[best] = True
        side = "below" if self.config.order == "desc" else "above"
        reasons = np.where(
            selected,
            "",
            np.where(passing, "passed the threshold, over the budget", f"{self.config.score} {side} {thr}"),
        )
        reasons = np.where(np.isnan(values), f"unscored by {self.config.score}", reasons)  # NaN never passes
        return Selection(selected, reasons.astype(object), {"passing": int(passing.sum())})

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        step = self._step(budget, eligible=Eligible(threshold=self.config.threshold))
        passing = cuts.count(step, []).get(0, 0)
        step = cuts.find(replace(step, quotas={0: min(budget, passing)}), [], {0: passing})
        return Plan((step,), {"passing": int(passing)})

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        (kept,) = plan.kept(batch)
        score, thr = self.config.score, self.config.threshold
        passing = plan.steps[0].passing(batch)
        side = "below" if self.config.order == "desc" else "above"
        reasons = np.where(kept, "", np.where(passing, "passed the threshold, over the budget", f"{score} {side} {thr}"))
        values = np.asarray(batch[score], dtype=np.float64)
        return kept, _unscored(values, reasons, kept, score, "unscored by {score}").astype(object)


class StratifiedParams(BaseModel):
    """Settings of the `stratified` policy (`select.params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    balance: Balance = Field(
        "cluster",
        description="split the budget in proportion to the clusters' sizes, or to the labels' (class-balanced: for "
        "labelled corpora whose clusters do not follow the labels)",
    )


@register_policy("stratified")
class StratifiedPolicy(Policy):
    """Each cluster (or, with `balance: label`, each label) gets budget in proportion to its size; inside it,
    the best rows by `score`."""

    Params = StratifiedParams

    def select(self, candidates: Candidates, budget: int) -> Selection:
        balance = self.config.typed_params().balance
        groups, _ = candidate_groups(candidates, balance)
        ids, sizes = np.unique(groups, return_counts=True)
        quotas = proportional_quotas(dict(zip(ids.tolist(), sizes.tolist(), strict=True)), budget)
        return take_within_clusters(candidates, quotas, self.config.score, self.config.order, group_by=balance)

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        balance = self.config.typed_params().balance
        sizes = stats.group_sizes(balance)
        quotas = proportional_quotas(sizes, budget)
        step = self._step(budget, group_by=balance, quotas=quotas, labels=stats.labels if balance == "label" else ())
        step = cuts.find(step, [], sizes)
        return Plan((step,), {"quotas": {int(c): int(q) for c, q in quotas.items()}})

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        (kept,) = plan.kept(batch)
        step, score = plan.steps[0], self.config.score
        reasons = np.array(
            [
                ""
                if k
                else f"outside the {step.quotas.get(int(g), 0)} kept in {group_name(step.group_by, int(g), step.labels)} by {score}"
                for k, g in zip(kept, step.groups(batch), strict=True)
            ],
            dtype=object,
        )
        return kept, reasons

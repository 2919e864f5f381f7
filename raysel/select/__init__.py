"""Selection policies: which usable rows to keep, inside a budget.

A policy is a class registered under a name, built from the run's `SelectConfig`, with

    select(candidates: Candidates, budget: int) -> Selection

`Candidates` are the usable rows (quarantined rows never reach a policy), sorted by id so that a
seed gives the same answer however the rows arrived. `Selection` says, per candidate, whether it
is kept and, if not, why; the ledger writes that reason. New policies (bandit-allocated budgets,
MIG, hard/easy mixes) register here and need no change to the pipeline: many of them decide a
budget per cluster and then call `take_within_clusters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.config import SelectConfig
from raysel.select.plan import CutService, Eligible, Plan, SelectionStats, Step, label_groups

if TYPE_CHECKING:
    from raysel.context import RunContext

POLICIES: dict[str, type[Policy]] = {}


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} is registered twice")
        POLICIES[name] = cls
        return cls

    return wrap


@dataclass
class Candidates:
    """The usable rows a policy chooses from: parallel arrays, sorted by id."""

    ids: np.ndarray
    cluster: np.ndarray
    scores: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # the corpus's label column, when it has one (class-aware policies)
    context: RunContext | None = None  # the run's shards and work dir, for policies that read embeddings or probe

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Selection:
    selected: np.ndarray  # bool per candidate
    reasons: np.ndarray  # object per candidate: "" when selected, else why not
    info: dict[str, Any] = field(default_factory=dict)  # a summary for the manifest (per-cluster quotas...)


def budget_rows(budget: float | int, usable: int) -> int:
    """A fraction of the usable rows (rounded half up: 0.5 of 21 rows is 11), or a count capped at the usable rows."""
    if isinstance(budget, float):
        return min(usable, int(np.floor(budget * usable + 0.5)))
    return min(usable, int(budget))


def rank(values: np.ndarray, order: str) -> np.ndarray:
    """Indices best-first; NaN (unscored) last; ties keep id order (candidates are sorted by id)."""
    key = -values if order == "desc" else values
    key = np.where(np.isnan(key), np.inf, key)
    return np.argsort(key, kind="stable")


def largest_remainder(weights: np.ndarray, total: int, caps: np.ndarray) -> np.ndarray:
    """Integer quotas proportional to `weights`, summing to `total`, none above its cap (Hamilton's method).

    What a capped cluster cannot take is passed on to the others in proportion to their weights.
    """
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    total = min(int(total), int(caps.sum()))
    quotas = np.zeros(len(weights), dtype=np.int64)
    while quotas.sum() < total:
        open_ = (quotas < caps) & (weights > 0)
        if not open_.any():
            open_ = quotas < caps
            weights = np.ones_like(weights)
        remaining = total - quotas.sum()
        share = np.where(open_, weights, 0.0)
        exact = remaining * share / share.sum()
        add = np.minimum(np.floor(exact).astype(np.int64), caps - quotas)
        if add.sum() == 0:  # hand out the remainder one by one, largest fraction first (ties: lower index)
            frac = np.where(open_, exact - np.floor(exact), -1.0)
            for i in np.argsort(-frac, kind="stable")[:remaining]:
                if quotas[i] < caps[i] and open_[i]:
                    quotas[i] += 1
            continue
        quotas += add
    return quotas


# --- budgets per group: per cluster (the default) or per label (class-balanced) ------------------------------

Balance = Literal["cluster", "label"]


def candidate_groups(candidates: Candidates, group_by: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(group id per candidate, the sorted labels) for a grouping by "cluster", "label" or "all"; the ids agree
    with those of a planned `Step` with the same grouping (SelectionStats.group_sizes)."""
    if group_by == "cluster":
        return np.asarray(candidates.cluster, dtype=np.int64), ()
    if group_by == "label":
        if candidates.labels is None:
            raise ValueError("grouping by label needs the corpus's label column: set input.label_field")
        labels = tuple(sorted({"" if v is None else str(v) for v in candidates.labels}))
        return label_groups(candidates.labels, labels), labels
    return np.zeros(len(candidates), dtype=np.int64), ()


def proportional_quotas(sizes: dict[int, int], budget: int) -> dict[int, int]:
    """Each group's share of `budget` in proportion to its size (largest remainder, capped at the size)."""
    groups = sorted(sizes)
    counts = np.array([sizes[g] for g in groups], dtype=np.int64)
    return dict(zip(groups, largest_remainder(counts, budget, caps=counts).tolist(), strict=True))


def group_name(group_by: str, group: int, labels: tuple[str, ...]) -> str:
    """How a reason names a group: "cluster 3", "label 'sport'"."""
    if group_by == "label":
        return f"label {labels[group]!r}" if 0 <= group < len(labels) else "an unknown label"
    return f"cluster {group}" if group_by == "cluster" else "the corpus"


def take_within_clusters(
    candidates: Candidates,
    quotas: dict[int, int],
    score: str | None,
    order: str,
    seed: int = 0,
    *,
    group_by: str = "cluster",
) -> Selection:
    """Keep the best `quotas[c]` rows of each cluster c by `score` (random when score is None); with
    `group_by="label"`, of each label (quotas keyed by the label's index among the sorted labels)."""
    selected = np.zeros(len(candidates), dtype=bool)
    reasons = np.empty(len(candidates), dtype=object)
    rng = np.random.default_rng(seed)
    groups, labels = candidate_groups(candidates, group_by)
    for c in np.unique(groups):
        members = np.flatnonzero(groups == c)
        q = int(quotas.get(int(c), 0))
        if score is None:
            best = members[rng.permutation(len(members))]
        else:
            best = members[rank(candidates.scores[score][members], order)]
        selected[best[:q]] = True
        where = group_name(group_by, int(c), labels)
        reasons[best[q:]] = f"outside the {q} kept in {where}" + ("" if score is None else f" by {score}")
    reasons[selected] = ""
    return Selection(selected, reasons, {"quotas": {int(c): int(q) for c, q in quotas.items()}})


class Policy:
    """Base of the selection policies; subclasses set `needs_score` and implement `select`, and, to run at any
    scale, `plan` and `apply` (raysel/select/plan.py): then the pipeline never holds a row per row.

    `select` stays as the in-memory form: the slow reference the plan/apply form is tested against, and the
    only form of the policies that are greedy over rows (mig) or probe rows (bandit)."""

    needs_score: ClassVar[bool] = True
    columns: ClassVar[tuple[str, ...]] = ()  # columns `rows` adds for the plan to read (d2: d2_rank)

    def __init__(self, config: SelectConfig) -> None:
        self.config = config

    def rows(self, assigned_uri: str, context: RunContext, centroids: np.ndarray) -> str:
        """The shards the plan and apply passes read: the assigned shards, or, for a policy that computes a column
        per cluster in Ray tasks first (d2), a copy of them with that column."""
        return assigned_uri

    def select(self, candidates: Candidates, budget: int) -> Selection:
        raise NotImplementedError

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan | None:
        """The steps, with their cuts found over the rows by `cuts`; None when the policy has no streaming form."""
        return None

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(kept, reason) for each of a block's candidate rows; reason is "" for a kept row."""
        raise NotImplementedError

    def _step(self, budget: int, **kw: Any) -> Step:
        fields = {"score": self.config.score, "order": self.config.order, "group_by": "all", "seed": self.config.seed}
        return Step(**{**fields, "quotas": {0: budget}, **kw})


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
        reasons = np.where(
            kept, "", np.where(passing, "passed the threshold, over the budget", f"{score} {side} {thr}")
        )
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


# The policies that live in their own modules register themselves on import (they import from this module).
from raysel.select import bandit, ccs, d2, hard_easy, mig  # noqa: E402,F401

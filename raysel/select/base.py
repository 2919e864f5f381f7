"""The base of the selection policies: which usable rows to keep, inside a budget.

A policy is a class registered under a name (raysel/registry.py), built from the run's `SelectConfig`, with

    select(candidates: Candidates, budget: int) -> Selection

`Candidates` are the usable rows (quarantined rows never reach a policy), sorted by id so that a
seed gives the same answer however the rows arrived. `Selection` says, per candidate, whether it
is kept and, if not, why; the ledger writes that reason. A new policy is one module in raysel/select/
(`@register_policy("name")` on a `Policy` subclass), one line in raysel/registry.py's built-ins and one
test file; the pipeline needs no change. Many policies decide a budget per cluster and then call
`take_within_clusters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from raysel.select.plan import CutService, Plan, SelectionStats, Step, label_groups

if TYPE_CHECKING:
    from raysel.config import SelectConfig
    from raysel.context import RunContext


@dataclass
class Candidates:
    """The usable rows a policy chooses from: parallel arrays, sorted by id."""

    ids: np.ndarray
    cluster: np.ndarray
    scores: dict[str, np.ndarray]
    labels: np.ndarray | None = None  # the corpus's label column, when it has one (class-aware policies)
    context: RunContext | None = None  # the run's shards and work dir, for policies that read embeddings or probe
    centroid_sim: np.ndarray | None = None  # each row's cosine to its pass-2 centroid (the bandit's nearest rows)

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
    only form of the policies that are greedy over rows (mig)."""

    needs_score: ClassVar[bool] = True
    # columns of the assigned shards (or of those `rows` writes) plan/apply read beyond ids, clusters, scores
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SelectConfig) -> None:
        self.config = config

    def rows(self, assigned_uri: str, context: RunContext, centroids: np.ndarray) -> str:
        """The shards the plan and apply passes read: the assigned shards, or, for a policy that computes a column
        per cluster in Ray tasks first (d2), a copy of them with that column (named in `reads`)."""
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

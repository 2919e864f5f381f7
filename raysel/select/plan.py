"""A policy in two halves: `plan` on the driver over bounded statistics, `apply` on the workers, per block.

    plan(stats: SelectionStats, budget: int, cuts: CutService) -> Plan       driver: O(clusters × bins)
    apply(batch: dict[str, np.ndarray], plan: Plan) -> (keep, reasons)       worker: one block's rows

A plan is a list of `Step`s, each an exact cut (raysel/cuts.py): which rows it ranks (a score and an
order, or none for a seeded random draw), how they are grouped (per cluster, per label, or the whole corpus,
optionally split further into strata of a score's range: `Strata`),
which rows are eligible (all candidates, those passing a threshold, those no earlier step kept) and
how many each group keeps. `CutService.find` runs the refinement passes over the rows through a
`BlockRunner`: Ray Data in the pipeline (raysel/select/stream.py), arrays in memory in tests. Ties are broken by a seeded hash of
the id, so a plan's decisions depend only on the rows, the config and the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from raysel.select.cuts import NONE, Cut, CutFinder, cut_score, decide, float_key, histogram, id_hash

if TYPE_CHECKING:
    from raysel.context import RunContext


@dataclass(frozen=True)
class SelectionStats:
    """What planning may know of the corpus: sizes, never rows.

    Attributes:
        usable: candidate rows (not quarantined, repeated ids removed).
        cluster_sizes: candidate rows per cluster id.
        context: the run's shards, input files, work dir and pass-2 centroids, for a policy that reads more
            than the candidate columns (the bandit probes rows); None outside a run.
        label_sizes: candidate rows per label ("" for a row without one); empty when the corpus has no label column.
    """

    usable: int
    cluster_sizes: dict[int, int]
    context: RunContext | None = None
    label_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels in sorted order: a `group_by: "label"` step's group i is labels[i]."""
        return tuple(sorted(self.label_sizes))

    def group_sizes(self, group_by: str) -> dict[int, int]:
        """Candidate rows per group id of a step grouped by `group_by` ("cluster", "label" or "all")."""
        if group_by == "cluster":
            return dict(self.cluster_sizes)
        if group_by == "label":
            if not self.label_sizes:
                raise ValueError("grouping by label needs the corpus's label column: set input.label_field")
            return {i: self.label_sizes[name] for i, name in enumerate(self.labels)}
        return {0: self.usable}


def label_groups(values: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
    """Group id of each row's label: its index in the sorted `labels` (-1 for a label not among them)."""
    index = {name: i for i, name in enumerate(labels)}
    return np.fromiter((index.get("" if v is None else str(v), -1) for v in values), dtype=np.int64, count=len(values))


@dataclass(frozen=True)
class Strata:
    """Equal-width strata of a score's range, per group: the stratum of a row of group g with score v is
    floor((v − lo[g]) / (hi[g] − lo[g]) · bins), clipped to bins − 1; an unscored row (NaN), or one of a group
    without a range, is in stratum `bins`. A stratified step's group id is base group × (bins + 1) + stratum."""

    score: str
    bins: int
    lo: dict[int, float]
    hi: dict[int, float]

    def of(self, values: np.ndarray, base: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        lo = np.array([self.lo.get(int(g), np.nan) for g in base], dtype=np.float64)
        hi = np.array([self.hi.get(int(g), np.nan) for g in base], dtype=np.float64)
        width = np.where(hi > lo, hi - lo, 1.0)
        with np.errstate(invalid="ignore"):
            raw = np.floor((values - lo) / width * self.bins)
        out = np.clip(np.nan_to_num(raw, nan=self.bins), 0, self.bins - 1).astype(np.int64)
        return np.where(np.isnan(values) | np.isnan(lo), self.bins, out)


@dataclass(frozen=True)
class Eligible:
    """Which candidates a step ranks: all, those passing a threshold, and/or those no earlier step kept, and/or
    those whose id the driver decided itself (the bandit's probed rows: bounded by its probe budget)."""

    threshold: float | None = None  # with the step's score and order: passing = at or beyond it
    not_kept_by: tuple[int, ...] = ()  # indices of earlier steps
    not_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Step:
    """One exact cut: per group, keep the `quotas[group]` best eligible rows by (score, order), ties by hash."""

    score: str | None  # None: rank by the seeded hash alone (a uniform random draw)
    order: Literal["asc", "desc"]
    group_by: Literal["cluster", "label", "all"]
    quotas: dict[int, int]
    seed: int
    eligible: Eligible = Eligible()
    cuts: dict[int, Cut] = field(default_factory=dict)
    labels: tuple[str, ...] = ()  # group_by "label": group i is labels[i] (SelectionStats.labels)
    strata: Strata | None = None  # each group split further into strata of a score

    def keys(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        hashes = id_hash(batch["id"], self.seed)
        if self.score is None:
            return hashes, np.zeros_like(hashes)
        return float_key(np.asarray(batch[self.score], dtype=np.float64), self.order), hashes

    def groups(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self.group_by == "cluster":
            base = np.asarray(batch["cluster"], dtype=np.int64)
        elif self.group_by == "label":
            base = label_groups(batch["label"], self.labels)
        else:
            base = np.zeros(len(batch["id"]), dtype=np.int64)
        if self.strata is None:
            return base
        return base * (self.strata.bins + 1) + self.strata.of(batch[self.strata.score], base)

    def passing(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        thr = self.eligible.threshold
        values = np.asarray(batch[self.score], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return (values >= thr) if self.order == "desc" else (values <= thr)

    def cut_value(self, group: int = 0) -> float:
        return (
            cut_score(self.cuts[group], self.order) if self.score is not None and group in self.cuts else float("nan")
        )


@dataclass(frozen=True)
class Plan:
    """The steps, their cuts found, and the summary the manifest shows."""

    steps: tuple[Step, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def kept(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Per step, which of the batch's candidate rows it keeps (a row kept by an earlier step is not eligible
        for a later one that says so)."""
        out: list[np.ndarray] = []
        for step in self.steps:
            eligible = eligible_rows(step, batch, out)
            k1, k2 = step.keys(batch)
            out.append(eligible & decide(step.groups(batch), k1, k2, step.cuts))
        return out


def eligible_rows(step: Step, batch: dict[str, np.ndarray], kept_before: list[np.ndarray]) -> np.ndarray:
    rows = np.ones(len(batch["id"]), dtype=bool)
    if step.eligible.threshold is not None:
        rows &= step.passing(batch)
    for i in step.eligible.not_kept_by:
        rows &= ~kept_before[i]
    if step.eligible.not_ids:
        rows &= np.fromiter((i not in step.eligible.not_ids for i in batch["id"]), dtype=bool, count=len(rows))
    return rows


class BlockRunner(Protocol):
    """Runs a function on every block of the candidate rows and returns the per-block results: on Ray in the
    pipeline (raysel/select/stream.py), over arrays in memory in tests (`ArrayBlocks`)."""

    def map_blocks(self, fn: Callable[..., Any], **kwargs: Any) -> list[Any]: ...


class CutService:
    """Counts and cuts over the candidate rows, a few passes each, through a BlockRunner."""

    def __init__(self, runner: BlockRunner) -> None:
        self.runner = runner
        self.passes = 0

    def count(self, step: Step, earlier: list[Step]) -> dict[int, int]:
        """Eligible rows per group."""
        self.passes += 1
        total: dict[int, int] = {}
        for part in self.runner.map_blocks(block_count, step=step, earlier=earlier):
            for g, c in part.items():
                total[g] = total.get(g, 0) + c
        return total

    def score_range(self, step: Step, earlier: list[Step], score: str) -> dict[int, tuple[float, float]]:
        """(smallest, largest) `score` per group among the step's eligible, scored rows (one pass)."""
        self.passes += 1
        total: dict[int, tuple[float, float]] = {}
        for part in self.runner.map_blocks(block_range, step=step, earlier=earlier, score=score):
            for g, (lo, hi) in part.items():
                old = total.get(g, (lo, hi))
                total[g] = (min(old[0], lo), max(old[1], hi))
        return total

    def find(self, step: Step, earlier: list[Step], sizes: dict[int, int]) -> Step:
        """The step with its cuts; for a scored step, with the score at each cut known exactly."""
        finder = CutFinder(step.quotas, sizes)
        while not finder.done:
            self.passes += 1
            finder.update(self.runner.map_blocks(block_pass, step=step, earlier=earlier, request=finder.request()))
        step = replace(step, cuts=finder.cuts)
        coarse = [g for g, c in step.cuts.items() if c.prefix != NONE and c.depth < 64]
        if step.score is not None and coarse:  # a whole bucket was kept: its largest key is the cut's score
            self.passes += 1
            largest: dict[int, int] = {}
            for part in self.runner.map_blocks(block_largest, step=step, earlier=earlier, groups=coarse):
                for g, k in part.items():
                    largest[g] = max(largest.get(g, 0), k)
            step = replace(step, cuts={**step.cuts, **{g: Cut(64, k) for g, k in largest.items()}})
        return step


def block_pass(batch: dict[str, np.ndarray], step: Step, earlier: list[Step], request) -> dict[str, np.ndarray]:
    """One block's share of a refinement pass (worker side): only the step's eligible rows count."""
    rows, k1, k2 = _eligible_keys(batch, step, earlier)
    return histogram(step.groups(batch)[rows], k1[rows], k2[rows], request)


def block_count(batch: dict[str, np.ndarray], step: Step, earlier: list[Step]) -> dict[int, int]:
    kept = Plan(tuple(earlier)).kept(batch) if earlier else []
    groups, counts = np.unique(step.groups(batch)[eligible_rows(step, batch, kept)], return_counts=True)
    return dict(zip(groups.tolist(), counts.tolist(), strict=True))


def block_range(batch, step: Step, earlier: list[Step], score: str) -> dict[int, tuple[float, float]]:
    kept = Plan(tuple(earlier)).kept(batch) if earlier else []
    values = np.asarray(batch[score], dtype=np.float64)
    rows = eligible_rows(step, batch, kept) & ~np.isnan(values)
    groups = step.groups(batch)[rows]
    return {
        int(g): (float(values[rows][groups == g].min()), float(values[rows][groups == g].max()))
        for g in np.unique(groups)
    }


def block_largest(batch: dict[str, np.ndarray], step: Step, earlier: list[Step], groups: list[int]) -> dict[int, int]:
    """Per group, the largest score key among the rows the step's cut keeps."""
    rows, k1, k2 = _eligible_keys(batch, step, earlier)
    g = step.groups(batch)
    kept = rows & decide(g, k1, k2, step.cuts)
    return {int(x): int(k1[kept & (g == x)].max()) for x in groups if (kept & (g == x)).any()}


def _eligible_keys(batch, step: Step, earlier: list[Step]):
    kept = Plan(tuple(earlier)).kept(batch) if earlier else []
    k1, k2 = step.keys(batch)
    return eligible_rows(step, batch, kept), k1, k2


class ArrayBlocks:
    """A BlockRunner over candidate columns held in memory, split into blocks (tests, and small corpora)."""

    def __init__(self, batch: dict[str, np.ndarray], blocks: int = 4) -> None:
        n = len(batch["id"])
        self.blocks = [{c: v[idx] for c, v in batch.items()} for idx in np.array_split(np.arange(n), blocks)]

    def map_blocks(self, fn: Callable[..., Any], **kwargs: Any) -> list[Any]:
        return [fn(b, **kwargs) for b in self.blocks]

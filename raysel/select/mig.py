"""The `mig` policy: greedy maximization of information gain over a label graph (MIG, arXiv 2504.13835).

Each row x carries a quality q_x (the `select.score`, min-max scaled to [quality_floor, 1], best = 1
by `select.order`; unscored rows 0) and a set of labels L_x: its cluster (`labels: cluster`), or the
tags of the input's label field (`labels: label`, split on `label_sep`). Labels are linked when the
cosine of their embeddings is >= `link_threshold` (a cluster's embedding is its centroid, a tag's the
mean embedding of its rows). Row x spreads its quality evenly over its labels and the propagation
matrix A carries it to linked labels:

    A[l, l] = 1,   A[m, l] = cos(l, m) if cos(l, m) >= link_threshold else 0
    v_x     = q_x * A @ (1[L_x] / |L_x|)                        (a vector over the labels)
    Phi(S)  = sum_l phi(sum_{x in S} v_x[l]),   phi(w) = (w + epsilon) ** exponent   (exponent 0.8)

Greedy selection adds, budget times, the row of largest gain Phi(S + x) - Phi(S) (ties: the lower
id). phi is concave, so gains only shrink as S grows (submodular), and rows with the same label set
differ only by q_x, so inside such a group the row of highest q has the largest gain. The lazy greedy
therefore keeps one heap entry per label-set group (its best remaining row, with a possibly stale
gain), re-evaluates only the entry that comes out on top, and takes it when its fresh gain still
beats every stale bound: exactly the plain greedy's choice, at O(budget * log groups) heap steps
instead of O(budget * rows) gain evaluations (1M rows, 1,024 clusters, budget 100k: seconds).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.errors import ConfigError
from raysel.select import Candidates, Policy, Selection, register_policy


@dataclass(frozen=True)
class RowLimit:
    """The most rows a policy that selects on the driver accepts, and what to do above it (pipeline checks it
    before collecting the rows).

    Attributes:
        rows: the limit.
        env: the variable that sets it.
        bytes_per_row: the driver memory a row costs, measured.
        alternatives: what to run instead, for the error above the limit.
    """

    rows: int
    env: str
    bytes_per_row: int
    alternatives: str


# The in-memory mig adds about 0.7-1.0 KB a row to the driver's peak (benchmarks/mig_memory.py, RESULTS.md §14: 717 B a
# row from 200k to 600k rows, 1,030 from 50k to 150k: the rows collected, the candidates, the shard index, the greedy's
# arrays), plus up to 256 MB of embeddings for the label geometry: 4M rows is ~4.3 GB, within a head node of 8 GB.
MIG_BYTES_PER_ROW = 1000
MAX_MIG_ROWS = int(os.environ.get("RAYSEL_MAX_MIG_ROWS", 4_000_000))


def propagation_matrix(label_embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """A [L, L]: 1 on the diagonal, the cosine between linked labels (cos >= threshold), 0 elsewhere."""
    e = np.asarray(label_embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    cos = e @ e.T
    a = np.where(cos >= threshold, cos, 0.0)
    np.fill_diagonal(a, 1.0)
    return a


def group_directions(label_sets: list[tuple[int, ...]], a: np.ndarray) -> np.ndarray:
    """[G, L]: A @ (1[set] / |set|) for each label set (a row's v_x is q_x times its set's direction)."""
    out = np.zeros((len(label_sets), a.shape[0]))
    for g, labels in enumerate(label_sets):
        if labels:
            out[g] = a[:, list(labels)].sum(1) / len(labels)
    return out


def gain(weights: np.ndarray, q: float, direction: np.ndarray, support: np.ndarray, exponent: float, eps: float):
    """Phi(W + q d) - Phi(W), summed over the labels where d is non-zero."""
    w = weights[support]
    return float(((w + q * direction[support] + eps) ** exponent - (w + eps) ** exponent).sum())


def mig_greedy(
    quality: np.ndarray,
    groups: np.ndarray,
    directions: np.ndarray,
    budget: int,
    *,
    exponent: float = 0.8,
    epsilon: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lazy greedy MIG. Returns (rows in the order taken, the gain of each, the final label weights W).

    Args:
        quality: q per row (>= 0).
        groups: per row, the index of its label set in `directions`.
        directions: [G, L] from `group_directions`.
        budget: rows to take.
        exponent: phi's exponent (concave below 1).
        epsilon: phi's offset.
    """
    n = len(quality)
    budget = min(budget, n)
    weights = np.zeros(directions.shape[1])
    supports = [np.flatnonzero(d) for d in directions]
    order = np.lexsort((np.arange(n), -quality, groups))  # per group: best quality first, ties by index
    bounds = np.searchsorted(groups[order], np.arange(directions.shape[0] + 1))
    head = bounds[:-1].copy()
    heap = []
    for g in range(directions.shape[0]):
        if head[g] < bounds[g + 1]:
            i = order[head[g]]
            heap.append((-gain(weights, quality[i], directions[g], supports[g], exponent, epsilon), int(i), g))
    heapq.heapify(heap)
    picks, gains = [], []
    while heap and len(picks) < budget:
        _, i, g = heapq.heappop(heap)
        fresh = gain(weights, quality[i], directions[g], supports[g], exponent, epsilon)
        if heap and (-fresh, i) > heap[0][:2]:  # a stale bound above it may still win: re-queue with the fresh gain
            heapq.heappush(heap, (-fresh, i, g))
            continue
        weights[supports[g]] += quality[i] * directions[g][supports[g]]
        picks.append(i)
        gains.append(fresh)
        head[g] += 1
        if head[g] < bounds[g + 1]:
            j = order[head[g]]
            heapq.heappush(
                heap, (-gain(weights, quality[j], directions[g], supports[g], exponent, epsilon), int(j), g)
            )
    return np.array(picks, dtype=np.int64), np.array(gains), weights


def scaled_quality(values: np.ndarray, order: str, floor: float) -> np.ndarray:
    """Scores min-max scaled to [floor, 1], 1 for the best by `order`; NaN (unscored) -> 0."""
    q = np.zeros(len(values))
    ok = np.isfinite(values)
    if not ok.any():
        return q
    v = values[ok] if order == "desc" else -values[ok]
    span = v.max() - v.min()
    q[ok] = floor + (1 - floor) * ((v - v.min()) / span if span > 0 else np.ones_like(v))
    return q


class MIGParams(BaseModel):
    """Settings of the `mig` policy (`select.params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: Literal["cluster", "label"] = Field("cluster", description="label = cluster, or the input's label field")
    label_sep: str | None = Field(None, description="split the label field on this to give a row several tags")
    link_threshold: float = Field(0.9, ge=-1, le=1, description="labels are linked when their cosine is >= this")
    exponent: float = Field(0.8, gt=0, le=1, description="phi(w) = (w + epsilon) ** exponent")
    epsilon: float = Field(1e-2, gt=0)
    quality_floor: float = Field(0.05, ge=0, le=1, description="the quality of the worst scored row")


@register_policy("mig")
class MIGPolicy(Policy):
    """MIG greedy selection (module docstring). Needs the run context for the label embeddings."""

    Params = MIGParams
    row_limit: ClassVar[RowLimit] = RowLimit(
        rows=MAX_MIG_ROWS,
        env="RAYSEL_MAX_MIG_ROWS",
        bytes_per_row=MIG_BYTES_PER_ROW,
        alternatives=(
            "MIG inside each cluster is `stratified` by the same score (a cluster is one label set: its greedy takes "
            "its best rows first), which plans on statistics and never holds the rows; or run mig on a sample of the "
            "corpus"
        ),
    )

    def select(self, candidates: Candidates, budget: int) -> Selection:
        from raysel.io.shards import ShardIndex, cluster_geometry, embedding_matrix

        params: MIGParams = self.config.typed_params()
        context = candidates.context
        if context is None:
            raise ConfigError("select.policy: mig needs the run context (embeddings); run it through raysel.pipeline")
        index = ShardIndex.build(context.scores_uri, candidates.ids)
        if params.labels == "cluster":
            names, groups = np.unique(candidates.cluster, return_inverse=True)
            label_emb, _ = cluster_geometry(index, groups, len(names))
            label_sets = [(g,) for g in range(len(names))]
        else:
            raw = candidates.labels
            if raw is None:
                raise ConfigError("select.params.labels: `label` needs input.label_field; or use labels: cluster")
            sep = params.label_sep
            per_row = [tuple(sorted({t.strip() for t in (str(v).split(sep) if sep else [str(v)])})) for v in raw]
            names = np.array(sorted({t for tags in per_row for t in tags}), dtype=object)
            code = {t: i for i, t in enumerate(names)}
            set_index: dict[tuple[int, ...], int] = {}
            groups = np.array([set_index.setdefault(tuple(code[t] for t in tags), len(set_index)) for tags in per_row])
            label_sets = list(set_index)
            by_group = None
            for cand, table in index.stream(["embedding"]):
                emb = embedding_matrix(table.column("embedding"))
                if by_group is None:
                    by_group = np.zeros((len(label_sets), emb.shape[1]))
                np.add.at(by_group, groups[cand], emb)
            label_emb = np.zeros((len(names), by_group.shape[1]))
            for g, labels in enumerate(label_sets):  # a tag's embedding: the sum (direction of the mean) of its rows
                label_emb[list(labels)] += by_group[g]
        a = propagation_matrix(label_emb, params.link_threshold)
        directions = group_directions(label_sets, a)
        quality = scaled_quality(candidates.scores[self.config.score], self.config.order, params.quality_floor)
        picks, gains, weights = mig_greedy(
            quality, groups, directions, budget, exponent=params.exponent, epsilon=params.epsilon
        )
        selected = np.zeros(len(candidates), dtype=bool)
        selected[picks] = True
        last = float(gains[-1]) if len(gains) else float("nan")
        reasons = np.empty(len(candidates), dtype=object)
        reasons[selected] = ""
        reasons[~selected] = f"not taken by the MIG greedy (its gain fell below the last taken, {last:.3g})"
        value = float(((weights + params.epsilon) ** params.exponent).sum())
        info = {
            "mig": {
                "labels": params.labels,
                "n_labels": int(len(names)),
                "links": int(((a > 0).sum() - len(a)) // 2),
                "label_sets": len(label_sets),
                "value": round(value, 6),
                "first_gain": float(gains[0]) if len(gains) else None,
                "last_gain": last if len(gains) else None,
            }
        }
        return Selection(selected, reasons, info)

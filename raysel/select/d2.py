"""The `d2` policy: D2 pruning, difficulty and diversity by message passing on the embedding graph
(Maharana, Yadav & Bansal, arXiv 2310.07931), computed inside each cluster so that it scales.

Inside a group of rows (a cluster, or with `balance: label` a label):

1. a k-nearest-neighbour graph of the embeddings (exact, cosine on the unit-norm embeddings; the distance
   of an edge is the Euclidean d(i, j) = ‖x_i − x_j‖);
2. each row's difficulty s_i is `select.score` scaled to [0, 1] within the group (1 = hardest: the highest
   with `order: desc`; unscored rows 0);
3. forward message passing: s_i ← s_i + Σ_{j ∈ N(i)} exp(−γ_f · d(i, j)) · s_j (a hard row in a dense,
   hard neighbourhood rises);
4. selection with reverse message passing: take the row of highest score, then lower each of its neighbours'
   s_j by exp(−γ_r · d(i, j)) · s_i (so the next pick comes from elsewhere); repeat. Ties by the seeded hash.

The order of the picks does not depend on the budget: the first q picks are D2's selection of q rows. So the
per-cluster pass writes each row's position in its group's order as the column `d2_rank` (0 = first pick;
a Ray task per group: `groupby(cluster).map_groups` over the scored shards, which hold the embeddings), and
the plan keeps, per group, the `quota` rows of smallest rank: one exact cut per group on the driver, with
quotas proportional to the groups' sizes. A group's graph costs O(n² · dim) for n rows (faiss, exact search):
clusters of ~100k rows take about a minute each on one core.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.errors import ConfigError
from raysel.select import (
    Balance,
    Candidates,
    Policy,
    Selection,
    candidate_groups,
    group_name,
    proportional_quotas,
    register_policy,
    take_within_clusters,
)
from raysel.select.cuts import id_hash
from raysel.select.plan import CutService, Plan, SelectionStats

if TYPE_CHECKING:
    from raysel.context import RunContext

RANK = "d2_rank"


class D2Params(BaseModel):
    """Settings of the `d2` policy (`select.params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(10, ge=1, description="neighbours per row in the graph")
    gamma_forward: float = Field(1.0, ge=0, description="γ_f: how fast a neighbour's difficulty fades with distance")
    gamma_reverse: float = Field(1.0, ge=0, description="γ_r: how far a pick lowers its neighbours' scores")
    balance: Balance = Field("cluster", description="the groups the graph is built in and the budget split over")


def difficulty(values: np.ndarray, order: str) -> np.ndarray:
    """The score scaled to [0, 1] within the group, 1 the hardest (highest for desc); NaN (unscored) 0."""
    v = np.asarray(values, dtype=np.float64)
    v = v if order == "desc" else -v
    finite = ~np.isnan(v)
    if not finite.any():
        return np.zeros(len(v))
    lo, hi = v[finite].min(), v[finite].max()
    out = np.where(finite, (v - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
    return np.nan_to_num(out, nan=0.0)


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours [n, k'], Euclidean distances [n, k']) of each row among the others, k' = min(k, n − 1), the
    nearest first (exact search by inner products, a block of rows at a time: O(block · n) memory)."""
    n = len(x)
    kk = min(k, n - 1)
    if kk <= 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0))
    x = np.ascontiguousarray(x, dtype=np.float64)  # float64: the pick order compares sums of these weights
    norms = (x**2).sum(axis=1)
    nbr = np.empty((n, kk), dtype=np.int64)
    dist = np.empty((n, kk), dtype=np.float64)
    for start in range(0, n, 512):
        rows = np.arange(start, min(start + 512, n))
        sims = x[rows] @ x.T
        sims[rows - start, rows] = -np.inf  # not its own neighbour
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_sims), axis=1)  # nearest first, ties by index
        nbr[rows] = np.take_along_axis(top, order, axis=1)
        near = np.take_along_axis(top_sims, order, axis=1)
        dist[rows] = np.sqrt(np.maximum(norms[rows, None] + norms[nbr[rows]] - 2 * near, 0.0))
    return nbr, dist


def d2_order(x: np.ndarray, s: np.ndarray, tiebreak: np.ndarray, params: D2Params) -> np.ndarray:
    """The rows of one group in D2's pick order (indices, the first pick first).

    Args:
        x: [n, dim] unit-norm embeddings.
        s: [n] difficulty in [0, 1] (`difficulty`).
        tiebreak: [n] uint64 seeded hashes: among equal scores, the smaller goes first.
        params: k, γ_f, γ_r.
    """
    nbr, dist = knn(x, params.k)
    score = s + (np.exp(-params.gamma_forward * dist) * s[nbr]).sum(axis=1) if nbr.size else s.astype(np.float64)
    lowered = np.exp(-params.gamma_reverse * dist)
    # A max-heap with an entry per score a row has had: a popped entry that is not the row's current score is stale.
    # (A pick whose own score fell below 0 raises its neighbours, so scores move both ways.)
    heap = [(-score[i], int(tiebreak[i]), i) for i in range(len(s))]
    heapq.heapify(heap)
    taken = np.zeros(len(s), dtype=bool)
    order: list[int] = []
    while heap:
        neg, tie, i = heapq.heappop(heap)
        if taken[i] or -neg != score[i]:
            continue
        taken[i] = True
        order.append(i)
        for j, w in zip(nbr[i], lowered[i], strict=True):
            if not taken[j]:
                score[j] -= w * score[i]
                heapq.heappush(heap, (-score[j], int(tiebreak[j]), int(j)))
    return np.array(order, dtype=np.int64)


def d2_ranks(x: np.ndarray, values: np.ndarray, ids: np.ndarray, params: D2Params, order: str, seed: int):
    """Each row's position in its group's D2 order (the group's rows given in any order: they are sorted by id
    first, so the ranks do not depend on how the rows arrived)."""
    by_id = np.argsort(ids.astype(str), kind="stable")
    picks = d2_order(x[by_id], difficulty(values[by_id], order), id_hash(ids[by_id], seed), params)
    ranks = np.empty(len(ids), dtype=np.float64)
    ranks[by_id[picks]] = np.arange(len(picks), dtype=np.float64)
    return ranks


def _assign_rows(batch: dict[str, np.ndarray], centroids: np.ndarray, repeats) -> dict[str, np.ndarray]:
    """A scored block as the assigned shards have it (cluster, centroid_sim), repeated ids quarantined."""
    from raysel.cluster import ClusterAssigner
    from raysel.select.stream import with_repeats

    return with_repeats(ClusterAssigner(centroids)(batch), repeats)


def _d2_group(batch: dict[str, np.ndarray], score: str, params: D2Params, order: str, seed: int):
    """One group's rows (a Ray task of `map_groups`): the `d2_rank` column, NaN for quarantined rows."""
    from raysel.proxy import batch_embeddings

    usable = np.flatnonzero(batch["reason"] == "")
    ranks = np.full(len(batch["id"]), np.nan)
    if len(usable):
        x = batch_embeddings(batch, usable)
        values = np.asarray(batch[score], dtype=np.float64)[usable]
        ranks[usable] = d2_ranks(x, values, batch["id"][usable], params, order, seed)
    out = {c: v for c, v in batch.items() if c != "embedding"}
    out[RANK] = ranks
    return out


@register_policy("d2")
class D2Policy(Policy):
    """D2 pruning per cluster (see the module docstring). Adds the column `d2_rank` to the rows it plans over.

    Example:
        >>> cfg = SelectConfig(budget=0.25, policy="d2", score="el2n", params={"k": 10})   # doctest: +SKIP
    """

    Params = D2Params
    reads = (RANK,)

    def rows(self, assigned_uri: str, context: RunContext, centroids: np.ndarray) -> str:
        """The assigned shards with `d2_rank`, computed per group in Ray tasks (cached beside them)."""
        from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards
        from raysel.io import fs as rfs
        from raysel.pipeline import write_shards
        from raysel.select.stream import _shuffle_partitions, repeated_ids

        p: D2Params = self.config.typed_params()
        key = rfs.settings_digest([p.model_dump(), self.config.score, self.config.order, self.config.seed])
        out = f"{assigned_uri}-d2-{key}"
        if rfs.exists(rfs.join(out, "_SUCCESS")):
            return out
        rfs.delete_dir(out)
        group = "cluster" if p.balance == "cluster" else "label"
        # a repeated id's later rows are quarantined first, so that they take no place in a graph
        repeats = repeated_ids(assigned_uri)
        ds = read_shards(context.scores_uri).map_batches(
            _assign_rows,
            fn_kwargs={"centroids": centroids, "repeats": repeats},
            batch_format="numpy",
            num_cpus=IO_TASK_CPUS,
        )
        ds = ds.groupby(group, num_partitions=_shuffle_partitions()).map_groups(
            _d2_group,
            fn_kwargs={"score": self.config.score, "params": p, "order": self.config.order, "seed": self.config.seed},
            batch_format="numpy",
            num_cpus=IO_TASK_CPUS,
        )
        write_shards(ds, out, context.config.shard_rows)
        rfs.write_text(rfs.join(out, "_SUCCESS"), "")
        return out

    def select(self, candidates: Candidates, budget: int) -> Selection:
        """The in-memory reference: the embeddings read on the driver, the same order per group."""
        from raysel.io.shards import ShardIndex, embedding_matrix

        p: D2Params = self.config.typed_params()
        if candidates.context is None:
            raise ConfigError("select.policy: d2 needs the run context (embeddings); run it through raysel.pipeline")
        emb = embedding_matrix(
            ShardIndex.build(candidates.context.scores_uri, candidates.ids)
            .read(np.arange(len(candidates)), ["embedding"])
            .column("embedding")
        )
        groups, _ = candidate_groups(candidates, p.balance)
        ranks = np.full(len(candidates), np.nan)
        values = np.asarray(candidates.scores[self.config.score], dtype=np.float64)
        for g in np.unique(groups):
            m = np.flatnonzero(groups == g)
            ranks[m] = d2_ranks(emb[m], values[m], candidates.ids[m], p, self.config.order, self.config.seed)
        ids, sizes = np.unique(groups, return_counts=True)
        quotas = proportional_quotas(dict(zip(ids.tolist(), sizes.tolist(), strict=True)), budget)
        ranked = Candidates(candidates.ids, candidates.cluster, {RANK: ranks}, candidates.labels)
        selection = take_within_clusters(ranked, quotas, RANK, "asc", group_by=p.balance)
        reasons = np.where(
            selection.selected, "", [r.replace(f"by {RANK}", "by the D2 order") for r in selection.reasons]
        )
        return Selection(selection.selected, reasons.astype(object), selection.info)

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        p: D2Params = self.config.typed_params()
        sizes = stats.group_sizes(p.balance)
        quotas = proportional_quotas(sizes, budget)
        labels = stats.labels if p.balance == "label" else ()
        step = self._step(budget, score=RANK, order="asc", group_by=p.balance, quotas=quotas, labels=labels)
        step = cuts.find(step, [], sizes)
        return Plan((step,), {"quotas": {int(c): int(q) for c, q in quotas.items()}})

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        (kept,) = plan.kept(batch)
        step = plan.steps[0]
        reasons = np.array(
            [
                ""
                if k
                else f"outside the {step.quotas.get(int(g), 0)} kept in {group_name(step.group_by, int(g), step.labels)}"
                " by the D2 order"
                for k, g in zip(kept, step.groups(batch), strict=True)
            ],
            dtype=object,
        )
        return kept, reasons

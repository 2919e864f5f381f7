"""Semantic deduplication (SemDedup) inside each cluster, as a drop step before any selection policy.

`select.semdedup: {threshold: 0.95}` walks each cluster's rows best first (by `select.score` and
`select.order`; without a score, by id) and keeps a row unless its cosine to a row already kept in
the same cluster exceeds the threshold; a dropped row's ledger reason names the kept row it repeats:
"near-duplicate of <id> (cos 0.97)", and it is `rejected`. Near-duplicates almost always share a
cluster, so comparing inside clusters costs sum_c n_c^2 instead of n^2.

How it runs (`SemDedup`, a drop step: raysel/select/drop.py): the candidate rows of the scored shards,
with their embeddings, get their cluster from pass 2's centroids in a map, are grouped by cluster
(`groupby("cluster").map_groups`), and each cluster's rows are deduplicated in its task (`dedup_cluster`);
the rows come out, without the embedding, with their `dropped` reason. The driver holds no row.

`drop_near_duplicates` is the same rule over candidates in memory (the embeddings streamed to the driver):
the slow reference the step is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raysel.errors import ConfigError
from raysel.select import Candidates, rank
from raysel.select.drop import DropInput, has_dropped, with_dropped

if TYPE_CHECKING:
    from raysel.config import RunConfig, SelectConfig
    from raysel.select.stream import Repeats

# Rows whose embeddings the driver holds at once (a wave of whole clusters; a larger cluster is a wave alone).
_MAX_ROWS_IN_MEMORY = 1_000_000
_BLOCK = 512


def dedup_cluster(embeddings: np.ndarray, threshold: float, block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Greedy near-duplicate removal over rows given best first.

    Row i is dropped when max_{kept j < i} cos(i, j) > threshold; it then points at the first kept row with
    that maximal cosine. Blocked: each block of rows is compared with the rows kept before it in one matrix
    product, and among itself row by row.

    Args:
        embeddings: [n, dim], best row first (normalized here).
        threshold: the cosine above which a row is a near-duplicate.
        block: rows per block.

    Returns:
        (dup_of, cos): per row, the index of the kept row it duplicates (-1 when kept) and that cosine (NaN when
        kept).
    """
    e = np.asarray(embeddings, dtype=np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    n = len(e)
    dup_of = np.full(n, -1, dtype=np.int64)
    cos = np.full(n, np.nan, dtype=np.float64)
    kept: list[int] = []
    for start in range(0, n, block):
        rows = e[start : start + block]
        if kept:
            prev = rows @ e[kept].T
            prev_best = prev.argmax(1)
            prev_val = prev[np.arange(len(rows)), prev_best]
        else:
            prev_best = np.zeros(len(rows), dtype=np.int64)
            prev_val = np.full(len(rows), -np.inf, dtype=np.float32)
        inner = rows @ rows.T
        mine: list[int] = []  # rows of this block kept so far (local indices)
        for i in range(len(rows)):
            val = float(prev_val[i])
            who = kept[prev_best[i]] if kept else -1
            if mine:
                local = inner[i, mine]
                j = int(local.argmax())
                if local[j] > val:  # an equal cosine keeps the earlier (better) kept row
                    val, who = float(local[j]), start + mine[j]
            if val > threshold:
                dup_of[start + i], cos[start + i] = who, val
            else:
                mine.append(i)
        kept.extend(start + i for i in mine)
    return dup_of, cos


@dataclass
class Deduplicated:
    """What `drop_near_duplicates` returns: the remaining candidates, and why each dropped one went."""

    candidates: Candidates
    keep: np.ndarray  # bool per original candidate
    reasons: np.ndarray  # "" for kept rows, else "near-duplicate of <id> (cos 0.97)"
    info: dict[str, Any] = field(default_factory=dict)


def priority(candidates: Candidates, config: SelectConfig) -> np.ndarray:
    """The rank of each candidate (0 = kept first): by `select.score` and `order`, NaN last; else by id."""
    if config.score is not None and config.score in candidates.scores:
        order = rank(candidates.scores[config.score], config.order)
    else:
        order = np.arange(len(candidates))
    pos = np.empty(len(candidates), dtype=np.int64)
    pos[order] = np.arange(len(candidates))
    return pos


def drop_near_duplicates(candidates: Candidates, context: Any, config: SelectConfig) -> Deduplicated:
    """Run SemDedup over the candidates (see the module docstring); needs the run context for the embeddings."""
    import ray

    from raysel.io.shards import ShardIndex, embedding_matrix

    if config.semdedup is None:
        raise ConfigError("select.semdedup is not set")
    if context is None:
        raise ConfigError("select.semdedup needs the run context (embeddings); run it through raysel.pipeline")
    threshold = config.semdedup.threshold
    n = len(candidates)
    prio = priority(candidates, config)
    index = ShardIndex.build(context.scores_uri, candidates.ids)
    clusters, arm_of = np.unique(candidates.cluster, return_inverse=True)
    sizes = np.bincount(arm_of, minlength=len(clusters))
    waves, current, held = [], [], 0
    for c in range(len(clusters)):
        if current and held + sizes[c] > _MAX_ROWS_IN_MEMORY:
            waves.append(current)
            current, held = [], 0
        current.append(c)
        held += sizes[c]
    if current:
        waves.append(current)

    task = ray.remote(num_cpus=1)(dedup_cluster)
    dup_of = np.full(n, -1, dtype=np.int64)
    cos = np.full(n, np.nan)
    for wave in waves:
        in_wave = np.flatnonzero(np.isin(arm_of, wave))
        slot = np.full(n, -1, dtype=np.int64)  # where a candidate of this wave sits in `emb`
        slot[in_wave] = np.arange(len(in_wave))
        emb: np.ndarray | None = None
        for cand, table in index.stream(["embedding"]):
            mine = slot[cand] >= 0
            if not mine.any():
                continue
            e = embedding_matrix(table.column("embedding"))
            if emb is None:
                emb = np.zeros((len(in_wave), e.shape[1]), dtype=np.float32)
            emb[slot[cand[mine]]] = e[mine]
        futures, members_of = [], []
        for c in wave:
            members = np.flatnonzero(arm_of == c)
            members = members[np.argsort(prio[members], kind="stable")]
            if len(members) < 2:
                continue
            futures.append(task.remote(emb[slot[members]], threshold))
            members_of.append(members)
        for members, (local_dup, local_cos) in zip(members_of, ray.get(futures), strict=True):
            hit = local_dup >= 0
            dup_of[members[hit]] = members[local_dup[hit]]
            cos[members[hit]] = local_cos[hit]
    keep = dup_of < 0
    reasons = np.full(n, "", dtype=object)
    for i in np.flatnonzero(~keep):
        reasons[i] = f"near-duplicate of {candidates.ids[dup_of[i]]} (cos {cos[i]:.2f})"
    labels = candidates.labels
    remaining = Candidates(
        ids=candidates.ids[keep],
        cluster=candidates.cluster[keep],
        scores={k: v[keep] for k, v in candidates.scores.items()},
        labels=None if labels is None else labels[keep],
        context=candidates.context,
    )
    kept_by = config.score if config.score is not None and config.score in candidates.scores else "id"
    info = {"threshold": threshold, "dropped": int((~keep).sum()), "kept_by": kept_by}
    return Deduplicated(remaining, keep, reasons, info)


class SemDedup:
    """The `select.semdedup` drop step on Ray (module docstring): same rule and choices as `drop_near_duplicates`.

    Args:
        config: the run (`select.semdedup`, and `select.score` / `select.order` for which row of a pair stays).
    """

    name = "semdedup"

    def __init__(self, config: RunConfig) -> None:
        self.threshold = config.select.semdedup.threshold
        score = config.select.score
        self.score = score if score is not None and score in config.score_columns else None
        self.order = config.select.order
        self.shard_rows = config.shard_rows

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "score": self.score, "order": self.order if self.score else None}

    def run(self, source: DropInput, out_uri: str) -> dict[str, Any]:
        """Every row of the scored shards, with `cluster`, `centroid_sim` and `dropped`, to `out_uri`."""
        from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards
        from raysel.pipeline import write_shards
        from raysel.select.stream import _shuffle_partitions

        if has_dropped(source.uri):  # it reads the scored shards, which know nothing of an earlier step
            raise RuntimeError("semdedup must be the first drop step")
        split = {"centroids": source.centroids, "repeats": source.repeats}
        rows = read_shards(source.scores_uri)
        candidates = rows.map_batches(
            _assigned, fn_kwargs={**split, "candidates": True}, batch_format="pyarrow", num_cpus=IO_TASK_CPUS
        )
        # One task per cluster, a whole CPU each: the pairwise cosines are matrix products.
        deduped = candidates.groupby("cluster", num_partitions=_shuffle_partitions()).map_groups(
            _dedup_group,
            fn_kwargs={"threshold": self.threshold, "score": self.score, "order": self.order},
            batch_format="pyarrow",
            num_cpus=1,
        )
        rest = rows.map_batches(
            _assigned, fn_kwargs={**split, "candidates": False}, batch_format="pyarrow", num_cpus=IO_TASK_CPUS
        )
        write_shards(deduped.union(rest), out_uri, self.shard_rows)
        return {"threshold": self.threshold, "kept_by": self.score or "id"}


def _assigned(table: pa.Table, centroids: np.ndarray, repeats: Repeats, candidates: bool) -> pa.Table:
    """The block's candidate rows (with the embedding) or its other rows (without, `dropped` ""), each with its
    cluster and the cosine to its centroid, as pass 2's assign_pass gives them."""
    from raysel.cluster import assign
    from raysel.io.shards import embedding_matrix
    from raysel.select.stream import with_repeats

    reasons = table.column("reason").to_numpy(zero_copy_only=False)
    cluster = np.full(table.num_rows, -1, dtype=np.int32)
    sim = np.full(table.num_rows, np.nan, dtype=np.float32)
    usable = np.flatnonzero(reasons == "")
    if len(usable):
        emb = embedding_matrix(table.column("embedding").take(pa.array(usable)))
        cluster[usable], sim[usable] = assign(emb, centroids)
    table = table.append_column("cluster", pa.array(cluster)).append_column("centroid_sim", pa.array(sim))
    where = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("reason", "source", "row")}
    is_candidate = with_repeats(where, repeats)["reason"] == ""
    if candidates:
        return table.filter(pa.array(is_candidate))
    rest = table.filter(pa.array(~is_candidate)).drop_columns(["embedding"])
    return with_dropped(rest, np.full(rest.num_rows, "", dtype=object))


def _dedup_group(group: pa.Table, threshold: float, score: str | None, order: str) -> pa.Table:
    """One cluster's candidates: best first as `priority` ranks them (by score, else id; ties by id), then
    `dedup_cluster`; the rows come back without the embedding, a dropped one with its reason."""
    group = group.sort_by([("id", "ascending"), ("source", "ascending"), ("row", "ascending")])
    n = group.num_rows
    if score is not None:
        best = rank(group.column(score).to_numpy(zero_copy_only=False).astype(np.float64), order)
    else:
        best = np.arange(n)
    reasons = np.full(n, "", dtype=object)
    if n >= 2:
        from raysel.io.shards import embedding_matrix

        ids = group.column("id").to_numpy(zero_copy_only=False)
        dup_of, cos = dedup_cluster(embedding_matrix(group.column("embedding"))[best], threshold)
        for i in np.flatnonzero(dup_of >= 0):
            reasons[best[i]] = f"near-duplicate of {ids[best[dup_of[i]]]} (cos {cos[i]:.2f})"
    return with_dropped(group.drop_columns(["embedding"]), reasons)

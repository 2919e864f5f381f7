"""Selection on Ray without a row per row on the driver: passes 2 (assign), 3 (statistics, plan) and 4 (apply).

    assign_pass        every scored row gets its cluster, in a map; the assigned shards (no embedding) are
                       kept in the work dir beside the centroids, for every later pass and run
    repeated_ids       a distributed group-by on the id; the driver learns only the repeated ids and where
                       they occur (bounded by the repeats, not the corpus)
    selection_stats    candidate rows per cluster and per label (one small count per block)
    RayBlocks          the BlockRunner through which a policy's `plan` runs its refinement passes: each pass
                       reads the candidate columns (id, cluster, reason, scores: ~20-40 bytes a row) and
                       sends back per-block histograms the driver adds up; DriverBlocks, below
                       IN_MEMORY_ROWS rows, reads those columns once and runs every pass on the driver
    apply_pass         each block's rows get status and reason from the plan; the workers write the ledger
    summarize_ledger   the manifest's counts, quarantine reasons, flags and cluster sizes, per block, merged

Drop steps (semdedup, drop_noisy: raysel/select/drop.py) run between the repeated ids and the statistics;
every pass after them reads their shards, where a row with a `dropped` reason is no candidate and the apply
pass rejects it with that reason. The policies that cannot be planned on statistics (mig) still
select in memory on the driver (pipeline.select_pass), over the same shards.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards
from raysel.cluster import ClusterAssigner
from raysel.io import fs as rfs
from raysel.select.drop import DROPPED, candidate_mask, has_dropped
from raysel.select.plan import Plan, SelectionStats

Repeats = dict[str, dict[int, str]]  # {source: {row: reason}} of the rows quarantined as repeated ids
CANDIDATE_COLUMNS = ["id", "cluster", "reason", "source", "row"]
MAX_REASONS = 10_000  # distinct quarantine reasons the summary keeps counting (the rarest are dropped past it)
# Below this many rows, a step that would shuffle (repeated ids, the selected rows grouped by file) runs on the
# driver instead (~60 bytes a row, 12 MiB at the default): a Ray shuffle's start-up costs seconds.
IN_MEMORY_ROWS = int(os.environ.get("RAYSEL_IN_MEMORY_ROWS", 200_000))


def _shuffle_partitions() -> int:
    """One group-by partition per CPU: Ray's default of 200 costs seconds of start-up on a small cluster."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


# --- pass 2: assign ------------------------------------------------------------------------------------------


def assign_pass(scores_uri: str, centroids: np.ndarray, out_uri: str, shard_rows: int) -> str:
    """Write every scored row with its `cluster` and `centroid_sim`, without the embedding (cached by the caller's
    key: done once per scores and centroids)."""
    from raysel.pipeline import write_shards

    if rfs.exists(rfs.join(out_uri, "_SUCCESS")):
        return out_uri
    rfs.delete_dir(out_uri)
    ds = read_shards(scores_uri).map_batches(
        _assign, fn_kwargs={"centroids": centroids}, batch_format="numpy", num_cpus=IO_TASK_CPUS
    )
    write_shards(ds, out_uri, shard_rows)
    rfs.write_text(rfs.join(out_uri, "_SUCCESS"), "")
    return out_uri


def _assign(batch: dict[str, np.ndarray], centroids: np.ndarray) -> dict[str, np.ndarray]:
    """Every row with its cluster, without its embedding (dropped here, not by a 1-CPU operator of Ray's own)."""
    out = ClusterAssigner(centroids)(batch)
    out.pop("embedding", None)
    return out


# --- repeated ids --------------------------------------------------------------------------------------------


def repeated_ids(assigned_uri: str) -> Repeats:
    """A repeated id keeps its first (file, row) occurrence; the later ones are quarantined, saying where it was.

    Up to IN_MEMORY_ROWS rows the ids are compared on the driver (about 60 bytes a row: a distributed shuffle
    costs more than that below a million rows); above, by a Ray group-by, and the driver sees the repeats only."""
    if rfs.parquet_rows(assigned_uri) <= IN_MEMORY_ROWS:
        table = pa.concat_tables(
            read_shards(assigned_uri, columns=["id", "reason", "source", "row"]).iter_batches(
                batch_format="pyarrow", batch_size=None
            )
        )
        table = table.filter(pa.compute.equal(table.column("reason"), ""))
        counts = table.group_by("id").aggregate([("id", "count")])
        repeated = set(counts.filter(pa.compute.greater(counts.column("id_count"), 1)).column("id").to_pylist())
        rows = table.filter(pa.compute.is_in(table.column("id"), pa.array(sorted(repeated), pa.string())))
        where = rows.to_pylist() if repeated else []
    else:
        from ray.data.expressions import col

        ds = read_shards(assigned_uri, columns=["id", "reason"]).map_batches(
            _usable_ids, batch_format="numpy", num_cpus=IO_TASK_CPUS
        )
        counted = ds.groupby("id", num_partitions=_shuffle_partitions()).count()
        # An Arrow predicate, not a Python lambda per row: above a million ids the lambda was most of this pass.
        repeated = {r["id"] for r in counted.filter(expr=col("count()") > 1, num_cpus=IO_TASK_CPUS).take_all()}
        where = (
            read_shards(assigned_uri, columns=["id", "reason", "source", "row"])
            .map_batches(_rows_with_ids, fn_kwargs={"ids": repeated}, batch_format="numpy", num_cpus=IO_TASK_CPUS)
            .take_all()
            if repeated
            else []
        )
    found: dict[str, list[tuple[str, int]]] = {}
    for r in where:
        found.setdefault(r["id"], []).append((str(r["source"]), int(r["row"])))
    out: Repeats = {}
    for places in found.values():
        first, *later = sorted(places)
        for source, row in later:
            out.setdefault(source, {})[row] = f"duplicate id (first at {first[0]}:{first[1]})"
    return out


def _usable_ids(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"id": batch["id"][batch["reason"] == ""]}


def _rows_with_ids(batch: dict[str, np.ndarray], ids: set[str]) -> dict[str, np.ndarray]:
    rows = (batch["reason"] == "") & np.isin(batch["id"], list(ids))
    return {c: batch[c][rows] for c in ("id", "source", "row")}


def with_repeats(batch: dict[str, np.ndarray], repeats: Repeats) -> dict[str, np.ndarray]:
    """The batch with its repeated ids' reasons filled in."""
    if not repeats:
        return batch
    reasons = np.asarray(batch["reason"], dtype=object).copy()
    for i, (source, row) in enumerate(zip(batch["source"], batch["row"], strict=True)):
        reason = repeats.get(source, {}).get(int(row))
        if reason is not None and reasons[i] == "":
            reasons[i] = reason
    return {**batch, "reason": reasons}


# --- pass 3: statistics and the plan's passes ----------------------------------------------------------------


def selection_stats(runner: RayBlocks) -> SelectionStats:
    sizes: Counter[int] = Counter()
    labels: Counter[str] = Counter()
    for clusters, label_counts in runner.map_blocks(_group_counts):
        sizes.update(clusters)
        labels.update(label_counts)
    return SelectionStats(
        usable=int(sum(sizes.values())),
        cluster_sizes=dict(sorted(sizes.items())),
        label_sizes=dict(sorted(labels.items())),
    )


def _group_counts(batch: dict[str, np.ndarray]) -> tuple[dict[int, int], dict[str, int]]:
    """Candidate rows per cluster and, when the shards have a label column, per label (bounded by the labels)."""
    clusters, counts = np.unique(np.asarray(batch["cluster"], dtype=np.int64), return_counts=True)
    labels = Counter("" if v is None else str(v) for v in batch["label"]) if "label" in batch else Counter()
    return dict(zip(clusters.tolist(), counts.tolist(), strict=True)), dict(labels)


class RayBlocks:
    """A BlockRunner over the candidate rows of the assigned shards: `fn(batch, **kwargs)` runs in a Ray task per
    block, on the candidates only (quarantined and repeated rows left out), and its results stream back."""

    def __init__(self, assigned_uri: str, repeats: Repeats, score_columns: list[str], *, labels: bool = False) -> None:
        self.uri = assigned_uri
        self.repeats = repeats
        # the label column only where the corpus has one (input.label_field): class-balanced budgets group by it
        self.columns = [
            *CANDIDATE_COLUMNS,
            *(["label"] if labels else []),
            *score_columns,
            *([DROPPED] if has_dropped(assigned_uri) else []),
        ]

    def map_blocks(self, fn: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
        ds = read_shards(self.uri, columns=self.columns).map_batches(
            _run_on_candidates,
            fn_kwargs={"fn": fn, "kwargs": kwargs, "repeats": self.repeats},
            batch_format="numpy",
            batch_size=None,
            num_cpus=IO_TASK_CPUS,
        )
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for blob in batch["result"]:
                yield pickle.loads(blob)


class DriverBlocks(RayBlocks):
    """RayBlocks for a corpus of at most IN_MEMORY_ROWS rows: the candidate columns (~40-100 bytes a row) are read
    once, block by block, and every refinement pass runs over them on the driver. The same blocks and the same
    functions as on Ray, so the same decisions; what it saves is a Ray Data execution per pass (about a second
    each), which is most of a small run's selection time."""

    def __init__(self, assigned_uri: str, repeats: Repeats, score_columns: list[str], *, labels: bool = False) -> None:
        super().__init__(assigned_uri, repeats, score_columns, labels=labels)
        self._blocks: list[dict[str, np.ndarray]] | None = None

    def map_blocks(self, fn: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
        if self._blocks is None:
            batches = read_shards(self.uri, columns=self.columns).iter_batches(batch_format="numpy", batch_size=None)
            self._blocks = [candidates_of(batch, self.repeats) for batch in batches]
        return (fn(block, **kwargs) for block in self._blocks)


def candidate_runner(
    assigned_uri: str, repeats: Repeats, score_columns: list[str], *, labels: bool = False
) -> RayBlocks:
    """The BlockRunner of pass 3: on Ray, or on the driver below IN_MEMORY_ROWS rows."""
    small = rfs.parquet_rows(assigned_uri) <= IN_MEMORY_ROWS
    return (DriverBlocks if small else RayBlocks)(assigned_uri, repeats, score_columns, labels=labels)


def candidates_of(batch: dict[str, np.ndarray], repeats: Repeats) -> dict[str, np.ndarray]:
    """A block's candidate rows: not quarantined, not a repeated id, not dropped by a drop step."""
    batch = with_repeats(batch, repeats)
    usable = candidate_mask(batch)
    return {c: v[usable] for c, v in batch.items() if c != DROPPED}


def _run_on_candidates(batch: dict[str, np.ndarray], fn: Callable[..., Any], kwargs: dict, repeats: Repeats):
    return {"result": np.array([pickle.dumps(fn(candidates_of(batch, repeats), **kwargs))], dtype=object)}


# --- pass 4: apply -------------------------------------------------------------------------------------------


def apply_pass(assigned_uri: str, repeats: Repeats, policy: Any, plan: Plan, ledger_uri: str) -> None:
    """Every row of the assigned shards gets its status and reason; the workers write the ledger."""
    ds = read_shards(assigned_uri).map_batches(
        _apply_block,
        fn_kwargs={"policy": policy, "plan": plan, "repeats": repeats},
        batch_format="numpy",
        num_cpus=IO_TASK_CPUS,
    )
    # Blocks reach the writers in input order, not in the order they finish: the same input and layout give the
    # same ledger files, byte for byte (tests/test_determinism.py).
    ds.context.execution_options.preserve_order = True
    fs, path = rfs.resolve(ledger_uri)
    # "overwrite": Ray then accepts names without its random write id; the folder is this run's staging folder.
    ds.write_parquet(
        path,
        filesystem=fs,
        filename_provider=_part_names(),
        mode="overwrite",
        ray_remote_args={"num_cpus": IO_TASK_CPUS},
    )


def _apply_block(batch: dict[str, np.ndarray], policy: Any, plan: Plan, repeats: Repeats) -> pa.Table:
    batch = with_repeats(batch, repeats)
    reasons = np.asarray(batch["reason"], dtype=object).copy()
    status = np.full(len(reasons), "quarantined", dtype=object)
    dropped = np.asarray(batch.pop(DROPPED, np.full(len(reasons), "", dtype=object)), dtype=object)
    gone = (reasons == "") & (dropped != "")  # left before the policy (a drop step): rejected, with its reason
    status[gone], reasons[gone] = "rejected", dropped[gone]
    usable = np.flatnonzero(reasons == "")
    if len(usable):
        kept, why = policy.apply({c: v[usable] for c, v in batch.items()}, plan)
        status[usable] = np.where(kept, "selected", "rejected")
        reasons[usable] = why
    columns = {c: v for c, v in batch.items() if c != "reason"}
    table = pa.table({"id": columns.pop("id"), "status": status.astype(str), "reason": reasons.astype(str)})
    for name, values in columns.items():
        table = table.append_column(name, pa.array(list(values) if values.dtype == object else values))
    return table


def _part_names():
    """Ledger file names from the write task's index (not Ray's random write id): the same on the same layout."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}.parquet"

    return PartNames()


# --- the manifest's view of the ledger ---------------------------------------------------------------------


def summarize_ledger(ledger_uri: str, score_columns: list[str], k: int) -> dict[str, Any]:
    """Counts per status, quarantine reasons, truncation flags, cluster sizes and unscored rows per score column,
    summed over the ledger's blocks in Ray tasks."""
    total: dict[str, Any] = {"rows": 0, "status": Counter(), "reasons": Counter(), "flags": Counter()}
    total["sizes"] = np.zeros(k, dtype=np.int64)
    total["unscored"] = Counter({s: 0 for s in score_columns})
    ds = read_shards(ledger_uri).map_batches(
        _summarize_block,
        fn_kwargs={"score_columns": score_columns, "k": k},
        batch_format="numpy",
        batch_size=None,
        num_cpus=IO_TASK_CPUS,
    )
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for blob in batch["result"]:
            part = pickle.loads(blob)
            total["rows"] += part["rows"]
            for key in ("status", "reasons", "flags", "unscored"):
                total[key].update(part[key])
            total["sizes"] += part["sizes"]
            if len(total["reasons"]) > MAX_REASONS:  # keep the driver bounded: forget the rarest reasons
                total["reasons"] = Counter(dict(total["reasons"].most_common(MAX_REASONS // 2)))
    return total


def _summarize_block(batch: dict[str, np.ndarray], score_columns: list[str], k: int) -> dict[str, np.ndarray]:
    status = batch["status"]
    usable = status != "quarantined"
    clusters = np.asarray(batch["cluster"], dtype=np.int64)
    part = {
        "rows": len(status),
        "status": Counter(status.tolist()),
        "reasons": Counter(batch["reason"][~usable].tolist()),
        "flags": Counter({c: int(np.sum(batch[c])) for c in ("text_cut", "embed_cut", "lm_cut") if c in batch}),
        "sizes": np.bincount(clusters[clusters >= 0], minlength=k)[:k] if k else np.zeros(0, np.int64),
        "unscored": Counter(
            {
                s: int(np.isnan(np.asarray(batch[s][usable], dtype=np.float64)).sum())
                for s in score_columns
                if s in batch
            }
        ),
    }
    return {"result": np.array([pickle.dumps(part)], dtype=object)}

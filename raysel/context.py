"""What a run hands to the steps that need more than a batch: scorer `prepare` steps and policies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raysel.cluster import sample_keys
from raysel.config import RunConfig
from raysel.io import fs as rfs


@dataclass
class RunContext:
    """A run's shared facts.

    Attributes:
        config: the resolved run config.
        scores_uri: the scored shards (Parquet: id, reason, source, row, embedding, label, scores...).
        work_dir: the folder of this corpus's cached state (keyed like the scores): put artifacts that may
            be reused under it (a proxy model, bandit rounds), in sub-folders named by what determines them.
        files: the input files, for joining rows back to their original records.
        centroids: pass 2's centroids [K, dim], unit norm (row c is cluster c); None before pass 2.
    """

    config: RunConfig
    scores_uri: str
    work_dir: str
    files: Sequence[Any] = field(default_factory=list)
    centroids: np.ndarray | None = None

    def path(self, *parts: str) -> str:
        return rfs.join(self.work_dir, *parts)

    def sample(self, columns: list[str], size: int, seed: int) -> dict[str, np.ndarray]:
        """Up to `size` usable rows (reason == ""), chosen by a seeded hash of their id: the same rows for
        the same corpus and seed, whatever order the shards stream in. Sorted by that hash."""
        return sample_rows(self.scores_uri, columns, size, seed)


# The share of the corpus the first pass over the shards keeps, as a multiple of the sample: enough that the
# smallest `size` keys are almost always among the rows kept (a shortfall reruns the pass with a higher bound).
_SAMPLE_MARGIN = 1.25


def sample_rows(scores_uri: str, columns: list[str], size: int, seed: int) -> dict[str, np.ndarray]:
    """The `size` usable rows with the smallest seeded hash of their id (`cluster.sample_keys`), sorted by it.

    The keys are computed in Ray tasks, where each block keeps only its usable rows whose key is below a bound
    that passes about 1.25 × `size` rows of the corpus (its row count is in the shards' footers); only those reach
    the driver, which keeps the smallest `size`. Where too few pass (many quarantined rows) the bound rises and
    the pass runs again. The rows are the same as hashing every row and keeping the smallest keys, whatever the
    block sizes or the order the shards stream in; the driver's memory is the sample's, not the corpus's."""
    from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards

    wanted = list(dict.fromkeys(["id", "reason", *columns]))
    total = rfs.parquet_rows(scores_uri)
    share = min(1.0, _SAMPLE_MARGIN * size / max(total, 1))
    while True:
        bound = None if share >= 1.0 else np.uint64(int(share * 2.0**64))
        ds = read_shards(scores_uri, columns=wanted).map_batches(
            _below_bound,
            fn_kwargs={"columns": wanted, "seed": seed, "bound": bound},
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=IO_TASK_CPUS,
        )
        keys, kept = _collect(ds, wanted)
        if len(keys) >= size or bound is None:
            break
        share = min(1.0, share * 4)
    if len(keys) > size:
        keep = np.argpartition(keys, size - 1)[:size]
        keys, kept = keys[keep], {c: v[keep] for c, v in kept.items()}
    order = np.argsort(keys, kind="stable")
    return {c: v[order] for c, v in kept.items()}


def _below_bound(batch: Any, columns: list[str], seed: int, bound: np.uint64 | None) -> Any:
    """A block's usable rows whose sample key is below `bound` (all of them if None), with the key as `_key`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    usable = batch.filter(pc.equal(batch.column("reason"), ""))
    keys = sample_keys(usable.column("id").to_numpy(zero_copy_only=False), seed)
    keep = np.ones(len(keys), dtype=bool) if bound is None else keys < bound
    return usable.select(columns).filter(pa.array(keep)).append_column("_key", pa.array(keys[keep], pa.uint64()))


def _collect(ds: Any, columns: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The kept rows on the driver: their keys and columns as numpy (a list column as a 2-D array)."""
    keys, kept = [], {c: [] for c in columns}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=16384):
        if not len(batch["_key"]):
            continue
        keys.append(batch["_key"])
        for c in columns:
            col = batch[c]
            kept[c].append(np.stack(col) if col.dtype == object and isinstance(col[0], np.ndarray) else col)
    if not keys:
        return np.empty(0, dtype=np.uint64), {}
    return np.concatenate(keys), {c: np.concatenate(v) for c, v in kept.items()}

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


def sample_rows(scores_uri: str, columns: list[str], size: int, seed: int) -> dict[str, np.ndarray]:

    from raysel._internal.ray_stage import read_shards

    wanted = list(dict.fromkeys(["id", "reason", *columns]))
    keys = np.empty(0, dtype=np.uint64)
    kept: dict[str, np.ndarray] = {}
    ds = read_shards(scores_uri, columns=wanted)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=16384):
        usable = batch["reason"] == ""
        if not usable.any():
            continue
        keys = np.concatenate([keys, sample_keys(batch["id"][usable], seed)])
        for c in wanted:
            col = batch[c][usable]
            if col.dtype == object and len(col) and isinstance(col[0], np.ndarray):
                col = np.stack(col)
            kept[c] = col if c not in kept else np.concatenate([kept[c], col])
        if len(keys) > size:
            keep = np.argpartition(keys, size - 1)[:size]
            keys = keys[keep]
            kept = {c: v[keep] for c, v in kept.items()}
    order = np.argsort(keys, kind="stable")
    return {c: v[order] for c, v in kept.items()}

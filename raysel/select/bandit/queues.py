"""The bandit's probe queues: per cluster, the rows its rounds may probe, in probing order, built in one pass.

A cluster's queue is its rows in the order the rounds probe them: `pick: nearest`, the largest cosine to
its pass-2 centroid first (`centroid_sim` of the assigned shards); `pick: random`, by a seeded hash of
the id; ties by id. The rounds never probe more than `cap` rows of one cluster (the probe budget in
rows, and per_arm × max_rounds when that is set), so each block sends its first `cap` rows per cluster
and the driver keeps the first `cap` of what arrives: it holds Σ_c min(size_c, cap) entries (id, source,
row and the order key, ~60 bytes each), never a row per row of the corpus.

An entry is named by a code that does not change when a later run raises the cap (a larger probe
budget continues a saved run): code = position in its queue × K + arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from raysel.select.cuts import id_hash

ENTRY_COLUMNS = ("id", "cluster", "source", "row")


def probe_order_key(ids: np.ndarray, centroid_sim: np.ndarray | None, pick: str, seed: int) -> np.ndarray:
    """The key the queues sort on, smallest first (ties by id): −cosine to the centroid, or the seeded id hash."""
    if pick == "nearest":
        return -np.asarray(centroid_sim, dtype=np.float64)
    return id_hash(ids, seed)


def block_queues(batch: dict[str, np.ndarray], caps: dict[int, int], pick: str, seed: int) -> dict[str, np.ndarray]:
    """One block's share (worker side): its first `caps[c]` rows of each cluster c, and a digest of its rows."""
    ids = np.asarray(batch["id"]).astype(str)
    cluster = np.asarray(batch["cluster"], dtype=np.int64)
    key = probe_order_key(ids, batch.get("centroid_sim"), pick, seed)
    part = _first_per_cluster(
        {
            "id": ids,
            "cluster": cluster,
            "source": np.asarray(batch["source"]).astype(str),
            "row": np.asarray(batch["row"], dtype=np.int64),
            "key": key,
        },
        caps,
    )
    # An order-independent digest of the (id, cluster) pairs: sums of 64-bit hashes wrap, in any block order.
    pairs = np.array([f"{i}\t{c}" for i, c in zip(ids, cluster, strict=True)], dtype=object)
    part["digest"] = np.array([id_hash(pairs, 0).sum(dtype=np.uint64)], dtype=np.uint64)
    return part


def _first_per_cluster(columns: dict[str, np.ndarray], caps: dict[int, int]) -> dict[str, np.ndarray]:
    """The rows sorted by (cluster, key, id), the first caps[c] of each cluster c kept."""
    cluster = columns["cluster"]
    order = np.lexsort((columns["id"], columns["key"], cluster))
    sorted_cluster = cluster[order]
    first = np.searchsorted(sorted_cluster, sorted_cluster, side="left")
    limit = np.array([caps.get(int(c), 0) for c in sorted_cluster], dtype=np.int64)
    keep = order[np.arange(len(order)) - first < limit]
    return {c: v[keep] for c, v in columns.items()}


@dataclass
class ProbeQueues:
    """The merged queues: entries sorted by (cluster, key, id), each cluster's first `caps[c]`.

    Attributes:
        arms: the cluster ids, in arm order (arm a is cluster arms[a]).
        id, cluster, source, row, key: per entry.
        starts: where each arm's entries begin (and the end, last).
        digest: the order-independent digest of every candidate's (id, cluster).

    Example:
        >>> queues = ProbeQueues.build(runner, arms=np.array([0, 3]), caps={0: 5, 3: 5}, pick="nearest", seed=0)
        >>> queues.codes()[1]               # arm 1 (cluster 3): its codes, in probing order   # doctest: +SKIP
        >>> queues.entries(np.array([1]))   # code 1: arm 1's first entry                     # doctest: +SKIP
    """

    arms: np.ndarray
    id: np.ndarray
    cluster: np.ndarray
    source: np.ndarray
    row: np.ndarray
    key: np.ndarray
    starts: np.ndarray
    digest: str

    @classmethod
    def build(cls, runner: Any, *, arms: np.ndarray, caps: dict[int, int], pick: str, seed: int) -> ProbeQueues:
        """One pass over the candidate rows through a BlockRunner (raysel/select/plan.py)."""
        merged: dict[str, np.ndarray] | None = None
        digest = np.uint64(0)
        for part in runner.map_blocks(block_queues, caps=caps, pick=pick, seed=seed):
            digest = np.array([digest, *part.pop("digest")], dtype=np.uint64).sum(dtype=np.uint64)  # wraps, silently
            if merged is None:
                merged = part
            else:  # keep the driver bounded: after every block, only the first caps[c] per cluster
                merged = _first_per_cluster({c: np.concatenate([merged[c], part[c]]) for c in merged}, caps)
        if merged is None:
            empty = np.zeros(0, dtype=np.int64)
            merged = {
                "id": empty.astype(str),
                "cluster": empty,
                "source": empty.astype(str),
                "row": empty,
                "key": empty.astype(np.float64),
            }
        starts = np.searchsorted(merged["cluster"], np.append(arms, np.iinfo(np.int64).max))
        starts[-1] = len(merged["cluster"])
        return cls(
            arms=np.asarray(arms, dtype=np.int64),
            starts=starts,
            digest=f"{int(digest):016x}",
            **merged,
        )

    def __len__(self) -> int:
        return len(self.id)

    def codes(self) -> list[np.ndarray]:
        """Per arm, the codes of its entries in probing order (BanditRun's queues)."""
        k = len(self.arms)
        return [np.arange(self.starts[a + 1] - self.starts[a], dtype=np.int64) * k + a for a in range(k)]

    def positions(self, codes: np.ndarray) -> np.ndarray:
        """The entry index (into id, source, ...) of each code."""
        codes = np.asarray(codes, dtype=np.int64)
        k = len(self.arms)
        return self.starts[codes % k] + codes // k

    def arm_of(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(codes, dtype=np.int64) % len(self.arms)

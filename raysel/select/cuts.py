"""Exact cuts over a corpus that never sits in one place: a budget per group, found by radix refinement.

Every candidate row has a 128-bit rank key, smaller = better: 64 bits from its score (by `order`,
unscored rows last) and 64 bits from a seeded hash of its id, which breaks ties the same way whatever
the order rows arrive in, the block sizes or the node count. A group (a cluster, or the whole corpus)
that keeps `q` of its `n` rows keeps exactly the rows whose key is at most its q-th smallest key.

`CutFinder` finds those keys without holding a row per row: each pass over the rows counts, per group
still open, how many keys fall into each of 256 buckets of the next 8 bits under the bits already
decided (`histogram`, run on the workers; the driver adds the counts up: O(open groups × 256)). The
bucket holding the q-th key becomes the new prefix. Once that bucket holds at most GATHER_ROWS rows,
the next pass brings just those keys to the driver, which sorts them and reads off the exact key.
Continuous scores resolve in 2 to 4 passes; a group whose budget is 0 or all of it takes none.

Example:
    >>> finder = CutFinder(quotas={0: 2, 1: 1}, sizes={0: 3, 1: 2})
    >>> while not finder.done:
    ...     finder.update(histogram(groups, k1, k2, finder.request()))
    >>> keep = decide(groups, k1, k2, finder.cuts)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DIGIT_BITS = 8
BUCKETS = 1 << DIGIT_BITS
GATHER_ROWS = 512
_TOP = np.uint64(1 << 63)
NONE = -1  # a cut that keeps nothing


def float_key(values: np.ndarray, order: str) -> np.ndarray:
    """uint64 keys in rank order: the best score (highest for desc) smallest, NaN largest (unscored last)."""
    x = np.asarray(values, dtype=np.float64)
    x = -x if order == "desc" else x.copy()
    x[x == 0] = 0.0  # -0.0 and 0.0 rank together
    bits = x.view(np.uint64)
    keys = np.where(bits & _TOP, ~bits, bits | _TOP)
    return np.where(np.isnan(x), np.uint64(np.iinfo(np.uint64).max), keys).astype(np.uint64)


def float_of_key(key: int, order: str) -> float:
    """The score a key stands for (the inverse of `float_key`)."""
    bits = np.uint64(key)
    raw = (bits & ~_TOP) if bits & _TOP else ~bits
    value = float(np.array([raw], dtype=np.uint64).view(np.float64)[0])
    return (-value if order == "desc" else value) + 0.0  # + 0.0: no "-0" in a reason


def id_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash per id: the tie-break, independent of where and in which order rows come."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


@dataclass(frozen=True)
class Cut:
    """Keep the rows whose key's top `depth` bits are at most `prefix` (`depth` 0: all; `prefix` NONE: none)."""

    depth: int
    prefix: int

    @staticmethod
    def all() -> Cut:
        return Cut(0, 0)

    @staticmethod
    def none() -> Cut:
        return Cut(0, NONE)


def _top(k1: np.ndarray, k2: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `depth` bits of the 128-bit keys as a (high, low) pair of uint64 arrays."""
    if depth == 0:
        return np.zeros_like(k1), np.zeros_like(k1)
    if depth <= 64:
        return k1 >> np.uint64(64 - depth), np.zeros_like(k1)
    if depth == 128:
        return k1, k2
    return k1, k2 >> np.uint64(128 - depth)


def _split(prefix: int, depth: int) -> tuple[np.uint64, np.uint64]:
    if depth <= 64:
        return np.uint64(prefix), np.uint64(0)
    return np.uint64(prefix >> (depth - 64)), np.uint64(prefix & ((1 << (depth - 64)) - 1))


def _digit(k1: np.ndarray, k2: np.ndarray, depth: int) -> np.ndarray:
    """The 8 bits after the top `depth` (depth a multiple of 8, < 128)."""
    if depth < 64:
        return ((k1 >> np.uint64(64 - DIGIT_BITS - depth)) & np.uint64(BUCKETS - 1)).astype(np.int64)
    return ((k2 >> np.uint64(128 - DIGIT_BITS - depth)) & np.uint64(BUCKETS - 1)).astype(np.int64)


def _in_bucket(k1, k2, depth: int, prefix: int) -> np.ndarray:
    hi, lo = _top(k1, k2, depth)
    p_hi, p_lo = _split(prefix, depth)
    return (hi == p_hi) & (lo == p_lo)


@dataclass(frozen=True)
class Request:
    """What the next pass must bring, per open group: a histogram under (depth, prefix), or the bucket's keys."""

    histogram: dict[int, tuple[int, int]]  # group -> (depth, prefix)
    gather: dict[int, tuple[int, int]]


def histogram(groups: np.ndarray, k1: np.ndarray, k2: np.ndarray, request: Request) -> dict[str, np.ndarray]:
    """One block's share of a pass (worker side): sparse counts per (group, bucket), and gathered keys."""
    out = {"bin": np.empty(0, np.int64), "count": np.empty(0, np.int64)}
    bins, counts, spans = [], [], []
    for g, (depth, prefix) in request.histogram.items():
        rows = (groups == g) & _in_bucket(k1, k2, depth, prefix)
        if rows.any():
            b, c = np.unique(_digit(k1[rows], k2[rows], depth), return_counts=True)
            bins.append(b + int(g) * BUCKETS)
            counts.append(c)
            order = np.lexsort((k2[rows], k1[rows]))
            lo, hi = order[0], order[-1]
            spans.append((g, k1[rows][lo], k2[rows][lo], k1[rows][hi], k2[rows][hi]))
    if bins:
        out = {"bin": np.concatenate(bins), "count": np.concatenate(counts).astype(np.int64)}
    span = np.array([s[1:] for s in spans], dtype=np.uint64).reshape(-1, 4)
    out["s_group"] = np.array([s[0] for s in spans], dtype=np.int64)
    out["s_keys"] = span  # per group: the smallest and the largest key in its bucket (k1, k2, k1, k2)
    gathered_g, gathered_1, gathered_2 = [], [], []
    for g, (depth, prefix) in request.gather.items():
        rows = (groups == g) & _in_bucket(k1, k2, depth, prefix)
        gathered_g.append(np.full(int(rows.sum()), g, np.int64))
        gathered_1.append(k1[rows])
        gathered_2.append(k2[rows])
    out["g_group"] = np.concatenate(gathered_g) if gathered_g else np.empty(0, np.int64)
    out["g_k1"] = np.concatenate(gathered_1) if gathered_1 else np.empty(0, np.uint64)
    out["g_k2"] = np.concatenate(gathered_2) if gathered_2 else np.empty(0, np.uint64)
    return out


class CutFinder:
    """The driver's side of the refinement: per group, the bits decided so far and the rank still wanted.

    Args:
        quotas: rows to keep per group.
        sizes: candidate rows per group (a quota is capped at its group's size).
    """

    def __init__(self, quotas: dict[int, int], sizes: dict[int, int]) -> None:
        self.cuts: dict[int, Cut] = {}
        self._open: dict[int, list[int]] = {}  # group -> [depth, prefix, rank wanted (1-based), bucket rows]
        self._gather: set[int] = set()
        self.passes = 0
        for g, n in sizes.items():
            q = min(int(quotas.get(g, 0)), int(n))
            if q <= 0:
                self.cuts[g] = Cut.none()
            elif q >= n:
                self.cuts[g] = Cut.all()
            else:
                self._open[g] = [0, 0, q, int(n)]
                if n <= GATHER_ROWS:
                    self._gather.add(g)

    @property
    def done(self) -> bool:
        return not self._open

    def request(self) -> Request:
        hist = {g: (s[0], s[1]) for g, s in self._open.items() if g not in self._gather}
        gather = {g: (s[0], s[1]) for g, s in self._open.items() if g in self._gather}
        return Request(hist, gather)

    def update(self, parts: list[dict[str, np.ndarray]]) -> None:
        """Add up one pass's per-block results and refine every open group by one digit (or finish it)."""
        self.passes += 1
        request = self.request()
        groups = np.array(sorted(request.histogram), dtype=np.int64)
        dense = np.zeros((len(groups), BUCKETS), dtype=np.int64)
        keys: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {g: [] for g in request.gather}
        spans: dict[int, tuple[int, int]] = {}  # group -> (smallest, largest) 128-bit key in its bucket
        for part in parts:
            if len(part["bin"]):
                rows = np.searchsorted(groups, part["bin"] // BUCKETS)
                np.add.at(dense, (rows, part["bin"] % BUCKETS), part["count"])
            for g, (a1, a2, b1, b2) in zip(part["s_group"].tolist(), part["s_keys"].tolist(), strict=True):
                lo, hi = (a1 << 64) | a2, (b1 << 64) | b2
                old = spans.get(g)
                spans[g] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
            for g in np.unique(part["g_group"]):
                mask = part["g_group"] == g
                keys[int(g)].append((part["g_k1"][mask], part["g_k2"][mask]))
        for i, g in enumerate(groups.tolist()):
            depth, prefix, want, _ = self._open[g]
            cumulative = np.cumsum(dense[i])
            digit = int(np.searchsorted(cumulative, want))  # the bucket holding the want-th key
            below = int(cumulative[digit - 1]) if digit else 0
            in_bucket = int(dense[i, digit])
            depth, prefix, want = depth + DIGIT_BITS, (prefix << DIGIT_BITS) | digit, want - below
            if below == 0 and in_bucket == cumulative[-1] and g in spans:
                # Every key shared this digit (equal scores, or unscored rows): skip to where the smallest and
                # largest keys of the bucket first differ, instead of one pass per 8 equal bits.
                lo, hi = spans[g]
                shared = 128 - (lo ^ hi).bit_length()
                jump = min(shared // DIGIT_BITS * DIGIT_BITS, 128 - DIGIT_BITS)
                if jump > depth:
                    depth, prefix = jump, lo >> (128 - jump)
            if want == in_bucket:  # the whole bucket is kept: the prefix is the cut
                self.cuts[g] = Cut(depth, prefix)
                del self._open[g]
                continue
            self._open[g] = [depth, prefix, want, in_bucket]
            if in_bucket <= GATHER_ROWS or depth == 128 - DIGIT_BITS:
                self._gather.add(g)
        for g, found in keys.items():
            k1 = np.concatenate([a for a, _ in found]) if found else np.empty(0, np.uint64)
            k2 = np.concatenate([b for _, b in found]) if found else np.empty(0, np.uint64)
            depth, prefix, want, _ = self._open.pop(g)
            self._gather.discard(g)
            order = np.lexsort((k2, k1))
            last = order[want - 1]
            self.cuts[g] = Cut(128, (int(k1[last]) << 64) | int(k2[last]))


def decide(groups: np.ndarray, k1: np.ndarray, k2: np.ndarray, cuts: dict[int, Cut]) -> np.ndarray:
    """Which rows their group's cut keeps (rows of a group without a cut: none)."""
    keep = np.zeros(len(groups), dtype=bool)
    for g in np.unique(groups):
        cut = cuts.get(int(g))
        if cut is None or cut.prefix == NONE:
            continue
        rows = groups == g
        hi, lo = _top(k1[rows], k2[rows], cut.depth)
        p_hi, p_lo = _split(cut.prefix, cut.depth)
        keep[rows] = (hi < p_hi) | ((hi == p_hi) & (lo <= p_lo))
    return keep


def cut_score(cut: Cut, order: str) -> float:
    """The score at a cut (the worst score kept), when the cut has decided all 64 score bits; else NaN."""
    if cut.prefix == NONE or cut.depth < 64:
        return float("nan")
    return float_of_key(cut.prefix >> (cut.depth - 64), order)

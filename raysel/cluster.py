"""Spherical k-means with FAISS: train on a sample of embeddings, assign every row to its nearest centroid.

Embeddings are L2-normalized, so "nearest" is the largest inner product (cosine), and the
centroids are re-normalized after each iteration (FAISS `spherical=True`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from raysel.config import ClusterConfig


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("Please install `faiss` to cluster embeddings (pip install faiss-cpu)") from err
    return faiss


def train_centroids(sample: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Centroids [k', dim] (k' = min(k, rows in the sample)), unit-norm, deterministic for a seed."""
    faiss = _faiss()
    x = np.ascontiguousarray(sample, dtype=np.float32)
    k = min(config.k, len(x))
    if k == len(x):
        return _normalize(x.copy())
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=config.niter,
        seed=config.seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, len(x) // k + 1),
    )
    km.train(x)
    return _normalize(np.asarray(km.centroids, dtype=np.float32))


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster id, cosine to its centroid) of each row: exact inner-product search."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int32), sims[:, 0].astype(np.float32)


def sample_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per id: keeping the smallest keys is a sample that does not depend on
    the order rows arrive in, so the same corpus and seed always train on the same rows."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )


class ClusterAssigner:
    """Adds `cluster` (-1 for quarantined rows) and `centroid_sim`; reads `embedding` and `reason`."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = centroids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        cluster = np.full(n, -1, dtype=np.int32)
        sim = np.full(n, np.nan, dtype=np.float32)
        usable = np.flatnonzero(batch["reason"] == "")
        if len(usable):
            cluster[usable], sim[usable] = assign(np.stack(batch["embedding"][usable]), self.centroids)
        out = dict(batch)
        out["cluster"], out["centroid_sim"] = cluster, sim
        return out


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

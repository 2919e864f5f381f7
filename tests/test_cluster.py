import numpy as np

from raysel.cluster import ClusterAssigner, assign, sample_keys, train_centroids
from raysel.config import ClusterConfig


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_assignment_matches_brute_force_cosine():
    rng = np.random.default_rng(0)
    x, c = _unit(rng, 500, 16), _unit(rng, 7, 16)
    ids, sims = assign(x, c)
    ref = x @ c.T
    assert (ids == ref.argmax(1)).all()
    np.testing.assert_allclose(sims, ref.max(1), rtol=1e-5, atol=1e-6)


def test_spherical_kmeans_is_seeded_unit_norm_and_finds_separated_clusters():
    rng = np.random.default_rng(1)
    centers = _unit(rng, 4, 32) * 4
    x = np.concatenate([centers[i] + rng.normal(scale=0.3, size=(100, 32)) for i in range(4)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = ClusterConfig(k=4, seed=3)
    a, b = train_centroids(x, cfg), train_centroids(x, cfg)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    labels = assign(x, a)[0]
    for i in range(4):  # every true cluster maps to one k-means cluster
        assert len(set(labels[i * 100 : (i + 1) * 100])) == 1
    assert len(set(labels)) == 4


def test_k_is_capped_at_the_sample_size():
    x = _unit(np.random.default_rng(2), 3, 8)
    assert train_centroids(x, ClusterConfig(k=10)).shape == (3, 8)


def test_sample_keys_depend_on_id_and_seed_not_order():
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    k = sample_keys(ids, 0)
    np.testing.assert_array_equal(sample_keys(ids[::-1], 0), k[::-1])
    assert (sample_keys(ids, 1) != k).any()


def test_assigner_skips_quarantined_rows():
    rng = np.random.default_rng(3)
    emb = _unit(rng, 3, 8)
    out = ClusterAssigner(_unit(rng, 2, 8))(
        {
            "id": np.array(["a", "b", "c"], dtype=object),
            "reason": np.array(["", "bad", ""], dtype=object),
            "embedding": emb,
        }
    )
    assert out["cluster"][1] == -1 and np.isnan(out["centroid_sim"][1])
    assert out["cluster"][0] >= 0 and out["cluster"][2] >= 0

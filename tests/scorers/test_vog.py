"""VoG against a NumPy computation over stored checkpoint gradients (closed-form input gradients of the head)."""

import numpy as np
import pytest

from raysel.config import ScorerConfig
from raysel.proxy import train_proxy
from raysel.scorers.vog import VoGScorer, checkpoint_indices


def blobs(n=80, d=16, names=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(names), d))
    y = rng.integers(0, len(names), n)
    x = centres[y] + 0.6 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.array([names[i] for i in y], dtype=object)


def numpy_input_grads(ck, x, y, of):
    """d(output_y)/dx of the ReLU head, by hand: W1ᵀ (relu'(W1 x + b1) ⊙ v) with v the output's gradient in h."""
    w1, b1, w2, b2 = (ck[n].astype(np.float64) for n in ("w1", "b1", "w2", "b2"))
    x = x.astype(np.float64)
    pre = x @ w1.T + b1
    h = np.maximum(pre, 0)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    v = w2[y]  # d logit_y / dh
    if of in ("log_prob", "prob"):
        v = v - p @ w2  # d log p_y / dh
    if of == "prob":
        v = v * p[np.arange(len(y)), y][:, None]
    return ((pre > 0) * v) @ w1


def numpy_vog(stored, y, sample_grads, sample_y, n_classes):
    """std over checkpoints per dim, mean over dims, z-scored with the sample's per-class mean and std."""

    def raw(g):  # g [K, N, D]
        return np.sqrt(((g - g.mean(0)) ** 2).mean(0)).mean(1)

    r, rs = raw(stored), raw(sample_grads)
    mean = np.array([rs[sample_y == c].mean() for c in range(n_classes)])
    std = np.array([rs[sample_y == c].std() for c in range(n_classes)])
    return r, (r - mean[y]) / std[y]


@pytest.mark.parametrize("of", ["logit", "log_prob", "prob"])
def test_vog_equals_numpy_over_stored_checkpoint_gradients(of):
    config = ScorerConfig(name="vog", params={"of": of, "checkpoints": 3, "proxy": {"hidden": 8, "epochs": 5}})
    params = config.typed_params()
    x, labels = blobs()
    run = train_proxy(x, labels, params.proxy)
    picked = checkpoint_indices(5, 3)
    assert picked == [0, 2, 4]
    # The class statistics come from the training sample (x); the rows scored are new ones.
    prepared = VoGScorer.prepared_from(run, params, x, labels)
    new_x, new_labels = blobs(n=20, seed=0)  # same centres, other draws
    out = VoGScorer(config, ("vog",), prepared)({"embedding": new_x, "label": new_labels})

    y_sample = np.searchsorted(np.array(run.labels, dtype=object), labels)
    y_new = np.searchsorted(np.array(run.labels, dtype=object), new_labels)
    stored = np.stack([numpy_input_grads(run.checkpoints[k], new_x, y_new, of) for k in picked])
    sample = np.stack([numpy_input_grads(run.checkpoints[k], x, y_sample, of) for k in picked])
    raw, z = numpy_vog(stored, y_new, sample, y_sample, 3)
    np.testing.assert_allclose(out["vog_raw"], raw, rtol=1e-4)
    np.testing.assert_allclose(out["vog"], z, rtol=1e-3, atol=1e-4)
    assert np.std(out["vog"]) > 0.1  # the score varies between examples of a class: it measures something


def test_vog_is_deterministic_and_nan_where_it_cannot_score():
    config = ScorerConfig(name="vog", params={"proxy": {"hidden": 8, "epochs": 4}})
    params = config.typed_params()
    x, labels = blobs()
    a = VoGScorer(config, ("vog",), VoGScorer.prepared_from(train_proxy(x, labels, params.proxy), params, x, labels))
    b = VoGScorer(config, ("vog",), VoGScorer.prepared_from(train_proxy(x, labels, params.proxy), params, x, labels))
    batch = {
        "embedding": x[:4],
        "label": np.array([labels[0], "unseen", labels[2], labels[3]], dtype=object),
        "reason": np.array(["", "", "", "bad json"], dtype=object),
    }
    va, vb = a(batch), b(batch)
    np.testing.assert_array_equal(va["vog"], vb["vog"])
    assert np.isnan(va["vog"][[1, 3]]).all() and np.isfinite(va["vog"][[0, 2]]).all()


def test_vog_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"params\.proxy: hidden: 0 gives VoG nothing to measure"):
        ScorerConfig(name="vog", params={"proxy": {"hidden": 0}})
    with pytest.raises(ValueError, match=r"params\.of"):
        ScorerConfig(name="vog", params={"of": "loss"})
    assert checkpoint_indices(10, None) == list(range(10))
    assert checkpoint_indices(10, 2) == [0, 9]

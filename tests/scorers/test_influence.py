"""Gradient influence (TracIn / LESS) against closed-form and backward()-loop references."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.proxy import logits, train_proxy
from raysel.scorers import influence as influence_module
from raysel.scorers._grad import jl_failure_bound
from raysel.scorers.influence import GradientFeatures, InfluenceScorer, read_targets
from raysel.scorers.vog import checkpoint_indices


def blobs(n=80, d=16, names=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(names), d))
    y = rng.integers(0, len(names), n)
    x = centres[y] + 0.6 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.array([names[i] for i in y], dtype=object)


def config(**params):
    return ScorerConfig(name="influence", params={"target": "unused.jsonl", **params})


def scorer_for(cfg, x, labels, target_x, target_labels, run=None):
    run = run or train_proxy(x, labels, cfg.typed_params().proxy)
    prepared = InfluenceScorer.prepared_from(run, cfg.typed_params(), target_x, target_labels)
    return InfluenceScorer(cfg, ("influence",), prepared), run


def last_layer_grad(ck, x, y):
    """Closed form for the output layer of the head: dℓ/dW2 = (p − e_y) hᵀ, dℓ/db2 = p − e_y."""
    w1, b1, w2, b2 = (ck[n].astype(np.float64) for n in ("w1", "b1", "w2", "b2"))
    h = np.maximum(x.astype(np.float64) @ w1.T + b1, 0)
    z = h @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p - np.eye(w2.shape[0])[y]
    return np.concatenate([r, np.einsum("nc,nh->nch", r, h).reshape(len(x), -1)], axis=1)


def backward_loop_grads(ck, x, y):
    """Per-example gradients of every parameter by one backward() per row (sorted parameter names)."""
    out = []
    for i in range(len(x)):
        params = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in ck.items()}
        xi = torch.tensor(x[i : i + 1], dtype=torch.float64)
        torch.nn.functional.cross_entropy(logits(params, xi), torch.tensor([y[i]])).backward()
        out.append(np.concatenate([params[n].grad.numpy().ravel() for n in sorted(params)]))
    return np.array(out)


def test_tracin_dot_on_the_last_layer_equals_the_closed_form():
    cfg = config(layers="last", similarity="dot", checkpoints=3, proxy={"hidden": 8, "epochs": 4, "lr": 0.3})
    x, labels = blobs()
    tx, tl = blobs(n=12, seed=0)
    scorer, run = scorer_for(cfg, x, labels, tx, tl)
    assert scorer.features.projector is None  # 27 parameters <= 8192: exact gradients
    names = np.array(run.labels, dtype=object)
    y, ty = np.searchsorted(names, labels), np.searchsorted(names, tl)
    ref = np.zeros(len(x))
    for k in checkpoint_indices(4, 3):
        g = last_layer_grad(run.checkpoints[k], x, y)
        t = last_layer_grad(run.checkpoints[k], tx, ty).mean(0)
        ref += run.lrs[k] * g @ t
    got = scorer({"embedding": x, "label": labels})["influence"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_cosine_over_all_parameters_equals_a_backward_loop():
    cfg = config(layers="all", similarity="cosine", checkpoints=2, proxy={"hidden": 8, "epochs": 3})
    x, labels = blobs()
    tx, tl = blobs(n=10, seed=0)
    scorer, run = scorer_for(cfg, x[:15], labels[:15], tx, tl, run=train_proxy(x, labels, cfg.typed_params().proxy))
    names = np.array(run.labels, dtype=object)
    y, ty = np.searchsorted(names, labels[:15]), np.searchsorted(names, tl)
    ref = np.zeros(15)
    for k in checkpoint_indices(3, 2):
        g = backward_loop_grads(run.checkpoints[k], x[:15], y)
        t = backward_loop_grads(run.checkpoints[k], tx, ty).mean(0)
        ref += run.lrs[k] * (g @ t) / (np.linalg.norm(g, axis=1) * np.linalg.norm(t))
    got = scorer({"embedding": x[:15], "label": labels[:15]})["influence"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_projected_influence_stays_within_the_jl_bound_of_the_exact_one():
    hidden, dim, eps = 64, 1024, 0.3  # 1283 parameters projected to 1024 dims
    assert jl_failure_bound(dim, eps) < 1e-7
    proxy = {"hidden": hidden, "epochs": 3}
    exact_cfg = config(similarity="dot", dim=8192, checkpoints=2, proxy=proxy)
    proj_cfg = config(similarity="dot", dim=dim, checkpoints=2, proxy=proxy, seed=11)
    x, labels = blobs()
    tx, tl = blobs(n=10, seed=0)
    exact, run = scorer_for(exact_cfg, x, labels, tx, tl)
    projected, _ = scorer_for(proj_cfg, x, labels, tx, tl, run=run)
    assert exact.features.projector is None and projected.features.projector is not None
    batch = {"embedding": x[:20], "label": labels[:20]}
    e, p = exact(batch)["influence"], projected(batch)["influence"]
    # |⟨Pg, Pt⟩ − ⟨g, t⟩| <= eps ‖g‖ ‖t‖ per checkpoint, summed with the learning rates.
    names = np.array(run.labels, dtype=object)
    y, ty = np.searchsorted(names, labels[:20]), np.searchsorted(names, tl)
    allowed = np.zeros(20)
    for k in checkpoint_indices(3, 2):
        g = backward_loop_grads(run.checkpoints[k], x[:20], y)
        t = backward_loop_grads(run.checkpoints[k], tx, ty).mean(0)
        allowed += run.lrs[k] * eps * np.linalg.norm(g, axis=1) * np.linalg.norm(t)
    assert (np.abs(p - e) <= allowed).all()
    assert not np.allclose(p, e)  # a real projection, not the identity


def test_influence_is_deterministic_for_a_seed(monkeypatch):
    cfg = config(dim=256, checkpoints=2, proxy={"hidden": 16, "epochs": 2})
    x, labels = blobs()
    tx, tl = blobs(n=6, seed=0)
    a, run = scorer_for(cfg, x, labels, tx, tl)
    b, _ = scorer_for(cfg, x, labels, tx, tl, run=train_proxy(x, labels, cfg.typed_params().proxy))
    c, _ = scorer_for(config(dim=256, checkpoints=2, seed=1, proxy={"hidden": 16, "epochs": 2}), x, labels, tx, tl)
    batch = {"embedding": x, "label": labels}
    sa = a(batch)["influence"]
    np.testing.assert_array_equal(sa, b(batch)["influence"])
    assert not np.allclose(sa, c(batch)["influence"])
    # Chunking the per-example gradients (the memory bound) does not change the result.
    monkeypatch.setattr(influence_module, "_GRAD_FLOATS", 3000)
    np.testing.assert_allclose(a(batch)["influence"], sa, rtol=1e-5, atol=1e-7)


def test_rows_it_cannot_score_are_nan_and_unknown_target_labels_are_dropped():
    cfg = config(proxy={"hidden": 8, "epochs": 2})
    x, labels = blobs()
    run = train_proxy(x, labels, cfg.typed_params().proxy)
    prepared = InfluenceScorer.prepared_from(run, cfg.typed_params(), x[:5], np.array(["a", "zz", "b", "c", "zz"]))
    assert prepared["target_label"].tolist() == [0, 1, 2]
    scorer = InfluenceScorer(cfg, ("influence",), prepared)
    batch = {
        "embedding": x[:3],
        "label": np.array(["a", "nope", "b"], dtype=object),
        "reason": np.array(["", "", "too long"], dtype=object),
    }
    got = scorer(batch)["influence"]
    assert np.isfinite(got[0]) and np.isnan(got[1]) and np.isnan(got[2])


def test_read_targets(tmp_path):
    lines = [
        {"text": "markets fell", "topic": "business"},
        {"text": "a goal late on", "topic": "sport"},
        {"text": "   ", "topic": "sport"},
        {"text": "no label here"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert read_targets(str(path), "text", "topic") == (["markets fell", "a goal late on"], ["business", "sport"], 2)
    pq.write_table(pa.Table.from_pylist(lines[:2]), tmp_path / "t.parquet")
    assert read_targets(str(tmp_path / "t.parquet"), "text", "topic")[1] == ["business", "sport"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"\n')
    with pytest.raises(ConfigError, match="line 1 is not valid JSON"):
        read_targets(str(tmp_path / "bad.jsonl"), "text", "topic")
    with pytest.raises(ConfigError, match="does not exist"):
        read_targets(str(tmp_path / "missing.jsonl"), "text", "topic")


def test_target_is_required_and_settings_are_checked():
    with pytest.raises(ValueError, match=r"params\.target: Field required"):
        ScorerConfig(name="influence")
    with pytest.raises(ValueError, match=r"params\.similarity"):
        config(similarity="euclid")
    assert GradientFeatures([{"w2": np.zeros((3, 4)), "b2": np.zeros(3)}], "last", 8192, "gaussian", 0).dim == 15

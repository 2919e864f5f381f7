"""The numerical cores (raysel/scorers/_grad.py) against slow, independent references."""

import itertools

import numpy as np
import pytest
import torch

from raysel.proxy import example_loss, init_params, logits, true_logit
from raysel.scorers._grad import (
    PROJECTION_BLOCK,
    RandomProjector,
    class_stats,
    class_zscore,
    el2n,
    flatten_grads,
    input_grads,
    jl_failure_bound,
    per_example_grads,
    vog_raw,
)


def _params(d=7, c=4, hidden=5, seed=0):
    return {n: v.double() for n, v in init_params(d, c, hidden, seed).items()}


def _data(n=6, d=7, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("hidden", [0, 5])
def test_vmap_grads_equal_a_loop_of_backward_calls(hidden):
    params = _params(hidden=hidden)
    x, y = _data()
    fast = per_example_grads(example_loss, params, x, y)
    for i in range(len(x)):
        leaf = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        loss = torch.nn.functional.cross_entropy(logits(leaf, x[i : i + 1]), y[i : i + 1])
        loss.backward()
        for n in params:
            torch.testing.assert_close(fast[n][i], leaf[n].grad, rtol=1e-12, atol=1e-12)


def test_linear_softmax_grads_are_p_minus_y_times_x():
    params = _params(hidden=0)
    x, y = _data()
    grads = per_example_grads(example_loss, params, x, y)
    w, b = params["w2"].numpy(), params["b2"].numpy()
    for i in range(len(x)):
        z = w @ x[i].numpy() + b
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        residual = p - np.eye(len(b))[y[i]]
        np.testing.assert_allclose(grads["w2"][i].numpy(), np.outer(residual, x[i].numpy()), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grads["b2"][i].numpy(), residual, rtol=1e-10, atol=1e-12)


def test_flatten_keeps_the_order_of_names():
    params = _params()
    x, y = _data(n=3)
    grads = per_example_grads(example_loss, params, x, y)
    flat = flatten_grads(grads, ["w2", "b1"])
    assert flat.shape == (3, 4 * 5 + 5)
    torch.testing.assert_close(flat[1, :20], grads["w2"][1].reshape(-1))
    torch.testing.assert_close(flat[1, 20:], grads["b1"][1])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products_within_the_jl_bound(kind):
    # 3 blocks and a ragged last one, so the block assembly is exercised.
    n, d, eps = 2 * PROJECTION_BLOCK + 300, 4096, 0.15
    bound = jl_failure_bound(d, eps)
    assert bound < 1e-8  # per pair; 190 pairs below: P(any violation) < 2e-6 for a random P
    g = torch.Generator().manual_seed(0)
    u = torch.randn(20, n, generator=g, dtype=torch.float64)
    u[10:] = u[:10] + 0.5 * u[10:]  # correlated pairs too, not only near-orthogonal ones
    u = u / u.norm(dim=1, keepdim=True)
    pu = RandomProjector(n, d, seed=3, kind=kind, dtype=torch.float64)(u)
    exact = u @ u.T
    approx = pu @ pu.T
    worst = max(abs(approx[i, j] - exact[i, j]).item() for i, j in itertools.combinations(range(20), 2))
    assert worst < eps
    # Norms are preserved too (i == j), and the error is not trivially zero (it is a real projection).
    assert (approx.diagonal() - 1).abs().max().item() < eps
    assert worst > 1e-4


def test_projection_matrix_matches_its_definition():
    n, d = PROJECTION_BLOCK + 17, 64
    proj = RandomProjector(n, d, seed=7, kind="rademacher", dtype=torch.float64)
    full = torch.cat([proj.block(0), proj.block(1)])  # Pᵀ, [n, d]
    assert full.shape == (n, d)
    assert set(np.unique(full.numpy() * np.sqrt(d)).round(12)) == {-1.0, 1.0}
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(proj(x), x @ full)
    gauss = RandomProjector(50_000, 128, seed=1, kind="gaussian", dtype=torch.float64)
    entries = torch.cat([gauss.block(i) for i in range(3)]).numpy() * np.sqrt(128)
    assert abs(entries.mean()) < 0.01 and abs(entries.std() - 1) < 0.01


def test_projection_is_deterministic_for_a_seed_and_independent_of_batching():
    n, d = 3000, 256
    x = torch.randn(9, n)
    a = RandomProjector(n, d, seed=5)(x)
    b = torch.cat([RandomProjector(n, d, seed=5)(x[:4]), RandomProjector(n, d, seed=5)(x[4:])])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, RandomProjector(n, d, seed=6)(x))


def test_jl_bound_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        jl_failure_bound(100, 1.5)


def test_el2n_reference_values():
    c = 5
    onehot = np.eye(c)[[0, 3]]
    assert el2n(onehot, np.array([0, 3])) == pytest.approx([0.0, 0.0], abs=1e-12)
    uniform = np.full((2, c), 1 / c)
    assert el2n(uniform, np.array([1, 4])) == pytest.approx([np.sqrt((c - 1) / c)] * 2, rel=1e-12)
    assert el2n(onehot, np.array([1, 2])) == pytest.approx([np.sqrt(2)] * 2, rel=1e-12)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(c), size=50)
    y = rng.integers(0, c, 50)
    ref = [np.linalg.norm(p[i] - np.eye(c)[y[i]]) for i in range(50)]
    np.testing.assert_allclose(el2n(p, y), ref, rtol=1e-12)


def test_input_grads_equal_backward_of_the_true_logit():
    params = _params()
    x, y = _data()
    fast = input_grads(true_logit, params, x, y)
    for i in range(len(x)):
        xi = x[i].clone().requires_grad_(True)
        logits(params, xi)[y[i]].backward()
        torch.testing.assert_close(fast[i], xi.grad, rtol=1e-12, atol=1e-12)


def test_vog_raw_matches_a_loop():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(4, 6, 3))  # K checkpoints, N examples, D dims
    ref = []
    for i in range(6):
        per_dim = []
        for p in range(3):
            s = [grads[k, i, p] for k in range(4)]
            mu = sum(s) / 4
            per_dim.append(np.sqrt(sum((v - mu) ** 2 for v in s) / 4))
        ref.append(sum(per_dim) / 3)
    np.testing.assert_allclose(vog_raw(grads), ref, rtol=1e-12)
    assert vog_raw(np.repeat(grads[:1], 4, axis=0)) == pytest.approx(np.zeros(6), abs=1e-15)


def test_class_zscore():
    values = np.array([1.0, 3.0, 10.0, 10.0, 5.0])
    label = np.array([0, 0, 1, 1, 2])
    mean, std = class_stats(values, label, 4)
    np.testing.assert_allclose(mean[:3], [2.0, 10.0, 5.0])
    np.testing.assert_allclose(std[:3], [1.0, 1.0, 1.0])  # class 1 and 2 have no spread: std taken as 1
    assert np.isnan(mean[3])
    np.testing.assert_allclose(class_zscore(values, label, mean, std), [-1, 1, 0, 0, 0])

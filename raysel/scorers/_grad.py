"""Numerical cores of the expensive scorers: per-example gradients, random projection, EL2N, VoG.

Plain functions over torch tensors (and NumPy where that is simpler), no Ray and no I/O, each tested
against a slow independent reference in tests/scorers/.

Per-example gradients
    `per_example_grads(loss_fn, params, x, y)` is `torch.func.vmap(torch.func.grad(loss_fn))`: the
    gradient of one example's loss with respect to every tensor in `params`, for every row at once.

Random projection (Johnson–Lindenstrauss)
    `RandomProjector(n_features, dim, seed, kind)` maps g ∈ R^n to P g ∈ R^d with P's entries i.i.d.
    ±1/√d (Rademacher) or N(0, 1/d) (Gaussian), so E[⟨Pu, Pv⟩] = ⟨u, v⟩. P is never held whole: it is
    drawn block by block (PROJECTION_BLOCK input columns per block, each block from its own generator
    seeded by (seed, block index)), so memory is d × PROJECTION_BLOCK floats whatever n is, and the same
    seed gives the same P however the work is chunked. Bound (Achlioptas 2003, Thm 1.1, for both kinds,
    applied to u ± v): for fixed unit vectors u, v,
        P( |⟨Pu, Pv⟩ − ⟨u, v⟩| > ε ) ≤ 4 · exp(−d (ε²/2 − ε³/3) / 2).
    For d = 8192 and ε = 0.1 that is 4 · e^−19.1 ≈ 2e-8 per pair.

EL2N (Paul et al. 2021)
    ‖softmax(f(x)) − onehot(y)‖₂: 0 for a confident correct prediction, √((C−1)/C) for a uniform one,
    √2 for a confident wrong one.

VoG (Agarwal, D'souza & Hooker 2022)
    S_k = ∂ logit_y / ∂x at checkpoint k (x: the input embedding); per input dimension p,
    V_p = sqrt(1/K Σ_k (S_k,p − μ_p)²) (the paper's eq. 2: the population standard deviation across
    checkpoints); VoG = mean_p V_p; then z-scored within each class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

# Input columns per block of the projection matrix: the block is d × this many floats (32 MiB at d = 8192).
PROJECTION_BLOCK = 1024


def jl_failure_bound(dim: int, eps: float) -> float:
    """Upper bound on P(|⟨Pu,Pv⟩ − ⟨u,v⟩| > eps) for fixed unit vectors u, v (see the module docstring).

    Args:
        dim: the projected dimension d.
        eps: the allowed error on the inner product of two unit vectors, in (0, 1).
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    return float(min(1.0, 4.0 * np.exp(-dim * (eps**2 / 2 - eps**3 / 3) / 2)))


def per_example_grads(loss_fn: Callable, params: dict[str, Any], x: Any, y: Any) -> dict[str, Any]:
    """Per-example gradients of `loss_fn(params, x_i, y_i)` with respect to `params`, for all rows i at once.

    Args:
        loss_fn: a function of (params dict, one input row, one target) returning a scalar tensor.
        params: name -> tensor; every tensor is differentiated.
        x: inputs [B, ...] (row i is passed to `loss_fn` without its batch dimension).
        y: targets [B, ...].

    Returns:
        name -> tensor [B, *param.shape].
    """
    from torch.func import grad, vmap

    return vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)


def input_grads(fn: Callable, params: dict[str, Any], x: Any, y: Any) -> Any:
    """Per-example gradients of `fn(params, x_i, y_i)` with respect to the input row x_i: [B, *x.shape[1:]].

    Args:
        fn: scalar function of (params dict, one input row, one target), e.g. the true-class logit.
        params: name -> tensor, held fixed.
        x: inputs [B, ...].
        y: targets [B, ...].
    """
    from torch.func import grad, vmap

    return vmap(grad(fn, argnums=1), in_dims=(None, 0, 0))(params, x, y)


def flatten_grads(grads: dict[str, Any], names: list[str]) -> Any:
    """Concatenate per-example gradients (name -> [B, ...]) in the order of `names` into one [B, n] tensor."""
    import torch

    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1)


class RandomProjector:
    """x ∈ R^n ↦ P x ∈ R^d, with P drawn block by block from a seed (see the module docstring).

    Args:
        n_features: n, the length of the vectors to project (e.g. the number of parameters).
        dim: d, the projected length.
        seed: fixes P.
        kind: "rademacher" (entries ±1/√d) or "gaussian" (entries N(0, 1/d)).
        device: torch device the blocks are drawn and multiplied on ("cpu", "cuda").
        dtype: torch dtype of the blocks (that of the vectors projected).

    Example:
        >>> import torch
        >>> proj = RandomProjector(5000, 256, seed=0)
        >>> proj(torch.randn(3, 5000)).shape
        torch.Size([3, 256])
    """

    KINDS = ("rademacher", "gaussian")

    def __init__(self, n_features: int, dim: int, *, seed: int, kind: str = "rademacher", device="cpu", dtype=None):
        import torch

        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if n_features < 1 or dim < 1:
            raise ValueError(f"n_features and dim must be >= 1, got {n_features} and {dim}")
        self.n_features, self.dim, self.seed, self.kind = n_features, dim, seed, kind
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32

    def block(self, index: int) -> Any:
        """Rows of Pᵀ for input columns [index·B, (index+1)·B) (B = PROJECTION_BLOCK): a [width, d] tensor."""
        import torch

        start = index * PROJECTION_BLOCK
        width = min(PROJECTION_BLOCK, self.n_features - start)
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
        scale = 1.0 / float(np.sqrt(self.dim))
        if self.kind == "gaussian":
            return torch.randn(width, self.dim, generator=gen, device=self.device, dtype=self.dtype).mul_(scale)
        bits = torch.randint(0, 2, (width, self.dim), generator=gen, device=self.device, dtype=torch.int8)
        return bits.to(self.dtype).mul_(2 * scale).sub_(scale)

    def __call__(self, x: Any) -> Any:
        """Project the rows of `x` ([B, n]) to [B, d]."""
        import torch

        if x.shape[-1] != self.n_features:
            raise ValueError(f"expected vectors of length {self.n_features}, got {x.shape[-1]}")
        x = x.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(x.shape[0], self.dim, device=self.device, dtype=self.dtype)
        for index in range((self.n_features + PROJECTION_BLOCK - 1) // PROJECTION_BLOCK):
            start = index * PROJECTION_BLOCK
            out.addmm_(x[:, start : start + PROJECTION_BLOCK], self.block(index))
        return out


def el2n(probs: np.ndarray, label: np.ndarray) -> np.ndarray:
    """‖probs − onehot(label)‖₂ per row.

    Args:
        probs: [N, C] rows of a probability simplex (softmax outputs).
        label: [N] integer class indices in [0, C).
    """
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(probs))
    # ‖p − e_y‖² = Σ p² − 2 p_y + 1: no one-hot matrix needed.
    sq = (probs**2).sum(axis=1) - 2 * probs[rows, label] + 1.0
    return np.sqrt(np.clip(sq, 0.0, None))


def vog_raw(grads: np.ndarray) -> np.ndarray:
    """VoG before class normalization: mean over dimensions of the std across checkpoints.

    Args:
        grads: [K, N, D] the input gradient of the true-class logit of N examples at K checkpoints.

    Returns:
        [N] float64.
    """
    g = np.asarray(grads, dtype=np.float64)
    return np.sqrt(((g - g.mean(axis=0, keepdims=True)) ** 2).mean(axis=0)).mean(axis=-1)


def class_stats(values: np.ndarray, label: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and standard deviation of `values` (NaN for a class with no rows; std 1 where it is 0).

    Args:
        values: [N] scores.
        label: [N] class indices in [0, n_classes).
        n_classes: C.
    """
    mean = np.full(n_classes, np.nan)
    std = np.full(n_classes, np.nan)
    for c in range(n_classes):
        v = values[label == c]
        if len(v):
            mean[c] = v.mean()
            std[c] = v.std() if v.std() > 0 else 1.0
    return mean, std


def class_zscore(values: np.ndarray, label: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(values − mean[label]) / std[label].

    Args:
        values: [N] scores.
        label: [N] class indices.
        mean: [C] per-class means (from `class_stats`).
        std: [C] per-class standard deviations.
    """
    return (values - mean[label]) / std[label]

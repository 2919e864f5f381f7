"""Exact per-example projected gradients of linear layers from one batched backward pass (LoGra).

For a linear layer y = W x + b and one example with tokens t, the loss gradient is
    ∇W = Σ_t δ_t x_tᵀ        (δ_t = ∂loss/∂y_t, x_t the layer input; with x̃_t = [x_t, 1] it covers b too)
Projecting both sides with seeded Gaussian factors P_in [D_in, k_in] and P_out [D_out, k_out] gives
    P_outᵀ ∇W P_in = Σ_t (P_outᵀ δ_t)(P_inᵀ x̃_t)ᵀ        [k_out, k_in]
which is the Kronecker-factored projection (P_out ⊗ P_in)ᵀ vec(∇W) of Choe et al. 2024 (LoGra, arXiv
2405.13954) computed without ever forming ∇W: a forward hook projects x̃_t, a hook on the output's gradient
projects δ_t, and one batched matrix product per layer sums the outer products per example. Padding tokens
are masked out of x̃, so they add nothing whatever δ is there.

The factors' entries are N(0, 1/k), so E[(P_out ⊗ P_in)(P_out ⊗ P_in)ᵀ] = I: inner products of projected
gradients are unbiased estimates of those of the full ones. Each factor is drawn on the CPU by a
torch.Generator seeded from (seed, layer name, side), then moved to the device: the same seed gives the
same projection on every node and device, whatever the order layers are visited in.

The low-rank damped Fisher whitening used for preconditioning (`Whitening`) is here too: it needs nothing
but the projected gradients.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Any

import numpy as np


def kron_dims(shapes: list[tuple[int, int]], dim: int) -> list[tuple[int, int]]:
    """Per-layer (k_in, k_out) with Σ k_in·k_out as close to `dim` as the layers allow, never above it.

    Every layer starts at k = ⌊√(dim / L)⌋ on both sides (capped by the layer's own sizes); the dimensions
    left over then go, a factor at a time, round-robin over the layers, to the smaller side.

    Args:
        shapes: per layer (D_in, D_out), D_in counting the bias column.
        dim: the total projected dimension asked for.
    """
    if not shapes:
        raise ValueError("no linear layer to project")
    if dim < len(shapes):
        raise ValueError(f"dim {dim} is smaller than the number of linear layers ({len(shapes)}): give dim >= that")
    k = max(1, math.isqrt(dim // len(shapes)))
    ks = [[min(k, d_in), min(k, d_out)] for d_in, d_out in shapes]
    left = dim - sum(a * b for a, b in ks)
    changed = True
    while changed:
        changed = False
        for (d_in, d_out), pair in zip(shapes, ks, strict=True):
            side = 0 if pair[0] <= pair[1] else 1
            if pair[side] >= (d_in, d_out)[side]:
                side = 1 - side
            cost = pair[1 - side]
            if pair[side] < (d_in, d_out)[side] and cost <= left:
                pair[side] += 1
                left -= cost
                changed = True
    return [(a, b) for a, b in ks]


def projection_factor(seed: int, name: str, side: str, rows: int, k: int) -> Any:
    """The seeded Gaussian factor [rows, k] (entries N(0, 1/k)) of layer `name`, `side` "in" or "out", on the CPU."""
    import torch

    digest = hashlib.blake2b(f"{seed}:{name}:{side}".encode(), digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(rows, k, generator=gen, dtype=torch.float32).mul_(1.0 / math.sqrt(k))


class KroneckerProjector:
    """Hooks linear layers and collects each example's projected gradient during one backward pass.

    Args:
        layers: name -> torch.nn.Linear, in the order their blocks of the feature vector are laid out.
        dim: total projected dimension (split over the layers by `kron_dims`; `self.dim` is what it came to).
        seed: fixes every factor.
        device: where the factors live (that of the model).

    Example:
        >>> proj = KroneckerProjector({"fc": torch.nn.Linear(8, 4)}, dim=6, seed=0)   # doctest: +SKIP
        >>> with proj.capture(mask):
        ...     loss_per_example(model(x), mask).sum().backward()
        >>> proj.features().shape        # [batch, 6]
    """

    def __init__(self, layers: dict[str, Any], *, dim: int, seed: int, device: Any = "cpu") -> None:
        self.layers = dict(layers)
        self.names = list(self.layers)
        shapes = [(m.in_features + (m.bias is not None), m.out_features) for m in self.layers.values()]
        self.ks = dict(zip(self.names, kron_dims(shapes, dim), strict=True))
        self.dim = sum(a * b for a, b in self.ks.values())
        self.seed = seed
        self.factors = {
            name: (
                projection_factor(seed, name, "in", d_in, self.ks[name][0]).to(device),
                projection_factor(seed, name, "out", d_out, self.ks[name][1]).to(device),
            )
            for name, (d_in, d_out) in zip(self.names, shapes, strict=True)
        }
        self._acc: dict[str, Any] = {}
        self._mask: Any = None

    def dense_matrix(self, name: str) -> Any:
        """The explicit [D_out·D_in, k_out·k_in] projection of one layer's flattened gradient (tests only)."""
        import torch

        p_in, p_out = self.factors[name]
        return torch.kron(p_out.cpu(), p_in.cpu())

    @contextmanager
    def capture(self, mask: Any):
        """Hook the layers for one forward+backward of a batch whose token mask [B, T] is `mask`."""
        self._acc = {}
        self._mask = mask
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._mask = None

    def _hook(self, name: str):
        import torch

        p_in, p_out = self.factors[name]
        has_bias = self.layers[name].bias is not None

        def forward_hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = inputs[0].detach()
            mask = self._mask
            if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
                raise ValueError(
                    f"layer {name} sees inputs of shape {tuple(x.shape)}, not [batch, tokens, features] for a "
                    f"batch of {tuple(mask.shape)}: per-example gradients need every token in its example's row"
                )
            x = x.float()
            if has_bias:
                x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=-1)
            xp = (x @ p_in) * mask.unsqueeze(-1).to(x.dtype)  # [B, T, k_in]; padding rows zeroed

            def grad_hook(grad):
                gp = grad.detach().float() @ p_out  # [B, T, k_out]
                part = torch.bmm(gp.transpose(1, 2), xp).reshape(gp.shape[0], -1)  # [B, k_out·k_in]
                self._acc[name] = self._acc[name] + part if name in self._acc else part

            output.register_hook(grad_hook)

        return forward_hook

    def features(self) -> Any:
        """[B, dim] float32: each example's projected gradient, layer blocks in `self.names` order."""
        missing = [n for n in self.names if n not in self._acc]
        if missing:
            raise RuntimeError(f"no gradient reached layers {missing[:3]}: was backward() run inside capture()?")
        return __import__("torch").cat([self._acc[n] for n in self.names], dim=1)


class Whitening:
    """ψ = (F + λI)^{-1/2} φ for the empirical Fisher F = GᵀG / N of N projected gradients G, without a d × d matrix.

    With G = U S Vᵀ (thin SVD, r = rank), F = V diag(S²/N) Vᵀ, so
        (F + λI)^{-1/2} φ = λ^{-1/2} φ + V [((S²/N + λ)^{-1/2} − λ^{-1/2}) ⊙ Vᵀφ]
    at O(r·d) a row. λ = damping × the mean non-zero eigenvalue of F (tr F / r): damping is relative, so the
    same value works whatever the gradients' scale. Then ⟨ψ_a, ψ_b⟩ = φ_aᵀ (F + λI)⁻¹ φ_b, the inverse-Fisher
    (Gauss-Newton) inner product of influence functions.

    Args:
        grads: [N, d] projected gradients to fit F on.
        damping: λ relative to the mean non-zero eigenvalue; > 0.
    """

    def __init__(self, grads: np.ndarray, damping: float) -> None:
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        g = np.asarray(grads, dtype=np.float64)
        _, s, vt = np.linalg.svd(g, full_matrices=False)
        keep = s > (s[0] if len(s) else 0) * 1e-10
        s, vt = s[keep], vt[keep]
        eig = s**2 / max(1, len(g))
        if not len(eig):
            raise ValueError("the gradients to fit the Fisher on are all zero")
        self.lam = float(damping * eig.mean())
        self.basis = vt  # [r, d]
        self.coef = (eig + self.lam) ** -0.5 - self.lam**-0.5
        self.eigenvalues = eig

    def __call__(self, phi: np.ndarray) -> np.ndarray:
        """[n, d] → [n, d] whitened rows."""
        phi = np.asarray(phi, dtype=np.float64)
        return phi * self.lam**-0.5 + ((phi @ self.basis.T) * self.coef) @ self.basis

    def state(self) -> dict[str, np.ndarray]:
        return {"lam": np.array(self.lam), "basis": self.basis, "coef": self.coef, "eigenvalues": self.eigenvalues}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Whitening:
        self = cls.__new__(cls)
        self.lam = float(state["lam"])
        self.basis, self.coef, self.eigenvalues = state["basis"], state["coef"], state["eigenvalues"]
        return self

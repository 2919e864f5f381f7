"""The bandit algorithms over clusters (arms), as plain seeded classes, and the maths from probes to budgets.

    UCBPolicy       score_k = S_k / C_k + alpha * sqrt(2 ln(sum_j C_j) / (C_k + 1)); unplayed arms first, with
                    neighbour credit (`neighbour_weights`: Quad's 1 - d / radius, or EQUAL's 1).
    EXP3SPolicy     Exp3.S as LEAD uses it: n arms drawn from p without replacement.
    ThompsonPolicy  Gaussian Thompson sampling, with the same neighbour credit as UCB.
    arm_estimates   each arm's shrunk mean probe score and the pooled within-arm deviation.
    estimated_cut   the cut tau with sum_k size_k P(N(mu_k, sigma^2) > tau) = budget.

Each has `propose()` / `update()` / `state_dict()` / `load_state_dict()`; raysel/select/bandit/__init__.py gives
the formulas in full.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# --- neighbour sharing ---------------------------------------------------------------------------------------

# Rows of the credit matrix computed at once: 256 × K float64 (20 MB at K = 10,000) and its temporaries.
_ROW_BLOCK = 256


class Credit:
    """A [K, K] credit matrix W (row a: the weight arm a's reward gives every arm), used two ways: `row(a)` when a
    reward comes in, `spread(x)` = W.T @ x for the probes' sums and counts.

    `neighbour_weights` computes its rows from the centroids when they are used, never the whole matrix: at
    Quad's 10,000 clusters a dense W is 800 MB, its temporaries several GB, and a sparse one no smaller where
    most arms lie within the radius of each other (as they do on a small or random encoder). Rows come a block
    at a time, so the memory is O(K × 256) whatever K. A matrix given as an array (tests, small K) is used as is.
    """

    def __init__(self, k: int, matrix: Any = None) -> None:
        self.k = k
        self.matrix = None if matrix is None else np.asarray(matrix, dtype=np.float64)

    def rows(self, arms: np.ndarray) -> np.ndarray:
        """[len(arms), K]: the given rows of W."""
        if self.matrix is not None:
            return self.matrix[arms]
        out = np.zeros((len(arms), self.k))
        out[np.arange(len(arms)), arms] = 1.0
        return out

    def row(self, arm: int) -> np.ndarray:
        return self.rows(np.array([arm]))[0]

    def spread(self, x: np.ndarray) -> np.ndarray:
        """W.T @ x, over the arms where x is not 0 (the probed ones), a block of rows at a time."""
        out = np.zeros(self.k)
        nonzero = np.flatnonzero(x)
        for start in range(0, len(nonzero), _ROW_BLOCK):
            arms = nonzero[start : start + _ROW_BLOCK]
            out += x[arms] @ self.rows(arms)
        return out

    def toarray(self) -> np.ndarray:
        return self.rows(np.arange(self.k))


class NeighbourCredit(Credit):
    """Quad's (1 - d / radius) or EQUAL's (1) credit between arms whose centroids are within `radius`."""

    def __init__(self, centroids: np.ndarray, radius: float, mode: str) -> None:
        super().__init__(len(centroids))
        self.centroids = np.asarray(centroids, dtype=np.float64)
        self.sq = (self.centroids * self.centroids).sum(1)
        self.radius, self.mode = radius, mode

    def rows(self, arms: np.ndarray) -> np.ndarray:
        c = self.centroids
        dist = np.sqrt(np.maximum(self.sq[arms, None] + self.sq[None, :] - 2 * c[arms] @ c.T, 0.0))
        near = dist < self.radius
        weights = np.where(near, 1.0 - dist / self.radius, 0.0) if self.mode == "quad" else near.astype(np.float64)
        weights[np.arange(len(arms)), arms] = 1.0
        return weights


def neighbour_weights(centroids: np.ndarray, radius: float, mode: str) -> Credit:
    """The credit matrix between arms (1 on the diagonal), its rows computed when used (`Credit`).

    Args:
        centroids: [K, dim] cluster centroids, unit norm.
        radius: arms whose centroids lie closer than this (Euclidean) share rewards.
        mode: `quad` weighs a neighbour by 1 - d / radius, `equal` by 1, `none` shares nothing.
    """
    if mode == "none" or radius <= 0 or len(centroids) == 0:
        return Credit(len(centroids))
    return NeighbourCredit(centroids, radius, mode)


def credit_matrix(share: Any, n_arms: int) -> Credit:
    """`share` as a Credit: `neighbour_weights`'s, an explicit [K, K] array, or none (no sharing)."""
    if isinstance(share, Credit):
        return share
    return Credit(n_arms, share)


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _rng_from(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def _mask(available: np.ndarray | None, k: int) -> np.ndarray:
    return np.ones(k, dtype=bool) if available is None else np.asarray(available, dtype=bool)


# --- the policies --------------------------------------------------------------------------------------------


class _CreditedArms:
    """Per-arm reward sums and counts, each reward also credited to neighbouring arms by `self.share` (row a:
    the weight arm a's reward gives every arm). UCB and Thompson keep the same state and differ in `propose`."""

    sums: np.ndarray
    counts: np.ndarray
    share: Credit
    rng: np.random.Generator

    def update(self, arms: np.ndarray | list[int], rewards: np.ndarray | list[float]) -> None:
        for a, r in zip(arms, rewards, strict=True):
            row = self.share.row(int(a))
            self.sums += row * float(r)
            self.counts += row

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist(), "rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = np.asarray(state["sums"], dtype=np.float64)
        self.counts = np.asarray(state["counts"], dtype=np.float64)
        self.rng = _rng_from(state["rng"])


class UCBPolicy(_CreditedArms):
    """UCB over K arms with neighbour reward sharing (Quad / EQUAL); see the module docstring for the formula.

    Args:
        n_arms: K.
        alpha: weight of the exploration term.
        share: [K, K] credit matrix from `neighbour_weights` (default: no sharing).
        seed: seeds the tie-breaking between arms of equal score.

    Example:
        >>> ucb = UCBPolicy(3, alpha=1.0, seed=0)
        >>> arms = ucb.propose(2)            # unplayed arms first, ties broken by the seeded RNG
        >>> ucb.update(arms, [0.5, -0.2])
        >>> ucb.load_state_dict(ucb.state_dict())
    """

    def __init__(self, n_arms: int, *, alpha: float = 1.0, share: Any = None, seed: int = 0) -> None:
        self.n_arms = n_arms
        self.alpha = alpha
        self.share = credit_matrix(share, n_arms)
        self.sums = np.zeros(n_arms)
        self.counts = np.zeros(n_arms)
        self.rng = np.random.default_rng(seed)

    def scores(self) -> np.ndarray:
        """score_k; +inf for an arm nothing was credited to yet."""
        total = max(float(self.counts.sum()), 1.0)
        explore = self.alpha * np.sqrt(2.0 * math.log(total) / (self.counts + 1.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(self.counts > 0, self.sums / self.counts, np.inf)
        return mean + explore

    def means(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.counts > 0, self.sums / self.counts, np.nan)

    def propose(self, n: int, available: np.ndarray | None = None) -> np.ndarray:
        """The n available arms with the largest scores (ties: a seeded random order)."""
        ok = _mask(available, self.n_arms)
        tiebreak = self.rng.random(self.n_arms)
        order = np.lexsort((tiebreak, -self.scores()))
        return order[ok[order]][:n]


class EXP3SPolicy:
    """EXP3-S over K arms, as LEAD uses it; see the module docstring for the update.

    Args:
        n_arms: K.
        gamma: the share of uniform exploration in p, in (0, 1].
        mix: Exp3.S's alpha: how much of the total weight every arm receives each update (tracks a best arm
            that changes over time).
        eta: the learning rate of the weights (None: gamma / K, Exp3.S's own).
        seed: seeds the draws.

    Example:
        >>> exp3 = EXP3SPolicy(4, gamma=0.2, seed=0)
        >>> arm = exp3.propose(1)
        >>> exp3.update(arm, [1.0])
        >>> exp3.probabilities().round(3)    # doctest: +SKIP
    """

    def __init__(
        self, n_arms: int, *, gamma: float = 0.1, mix: float = 0.01, eta: float | None = None, seed: int = 0
    ) -> None:
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.n_arms = n_arms
        self.gamma = gamma
        self.eta = gamma / n_arms if eta is None else eta
        self.mix = mix
        self.log_weights = np.zeros(n_arms)
        self.rng = np.random.default_rng(seed)
        self.last_probs: np.ndarray | None = None
        self.last_n = 1

    def probabilities(self, available: np.ndarray | None = None) -> np.ndarray:
        """p_k = (1 - gamma) w_k / sum w + gamma / K, over the available arms (0 elsewhere)."""
        ok = _mask(available, self.n_arms)
        probs = np.zeros(self.n_arms)
        if not ok.any():
            return probs
        w = np.exp(self.log_weights[ok] - self.log_weights[ok].max())
        probs[ok] = (1.0 - self.gamma) * w / w.sum() + self.gamma / ok.sum()
        return probs

    def propose(self, n: int, available: np.ndarray | None = None) -> np.ndarray:
        """n distinct arms drawn from p without replacement (Gumbel top-n), most likely first."""
        probs = self.probabilities(available)
        ok = probs > 0
        n = min(n, int(ok.sum()))
        keys = np.full(self.n_arms, -np.inf)
        gumbel = self.rng.gumbel(size=self.n_arms)
        keys[ok] = np.log(probs[ok]) + gumbel[ok]
        self.last_probs, self.last_n = probs, max(n, 1)
        return np.argsort(-keys, kind="stable")[:n]

    def update(self, arms: np.ndarray | list[int], rewards: np.ndarray | list[float]) -> None:
        probs = self.last_probs if self.last_probs is not None else self.probabilities()
        k = self.n_arms
        x_hat = np.zeros(k)
        for a, r in zip(arms, rewards, strict=True):
            x_hat[int(a)] = float(r) / min(1.0, self.last_n * probs[int(a)])
        # w_k <- w_k exp(eta x_hat_k) + (e mix / K) sum_j w_j, in logs shifted by the max: no overflow.
        top = self.log_weights.max()
        w = np.exp(self.log_weights - top)
        new = w * np.exp(np.minimum(self.eta * x_hat, 700.0)) + math.e * self.mix / k * w.sum()
        self.log_weights = np.log(new) + top
        self.log_weights -= self.log_weights.max()
        self.last_probs = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_weights": self.log_weights.tolist(),
            "rng": _rng_state(self.rng),
            "last_probs": None if self.last_probs is None else self.last_probs.tolist(),
            "last_n": self.last_n,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_weights = np.asarray(state["log_weights"], dtype=np.float64)
        self.rng = _rng_from(state["rng"])
        self.last_probs = None if state.get("last_probs") is None else np.asarray(state["last_probs"])
        self.last_n = int(state.get("last_n", 1))


class ThompsonPolicy(_CreditedArms):
    """Gaussian Thompson sampling over K arms, with the same neighbour credit as UCB.

    Posterior of arm k after credited reward sum S_k and count C_k:
        precision_k = 1 / prior_std^2 + C_k / noise_std^2,   mean_k = (S_k / noise_std^2) / precision_k.

    Args:
        n_arms: K.
        prior_std: prior standard deviation of an arm's mean reward (rewards are centred by the offset).
        noise_std: standard deviation of one round's reward around the arm's mean.
        share: [K, K] credit matrix from `neighbour_weights` (default: no sharing).
        seed: seeds the posterior draws.

    Example:
        >>> ts = ThompsonPolicy(3, seed=0)
        >>> ts.update([0], [1.0])
        >>> ts.posterior()[0].round(3)
        array([0.5, 0. , 0. ])
    """

    def __init__(
        self,
        n_arms: int,
        *,
        prior_std: float = 1.0,
        noise_std: float = 1.0,
        share: Any = None,
        seed: int = 0,
    ) -> None:
        self.n_arms = n_arms
        self.prior_std = prior_std
        self.noise_std = noise_std
        self.share = credit_matrix(share, n_arms)
        self.sums = np.zeros(n_arms)
        self.counts = np.zeros(n_arms)
        self.rng = np.random.default_rng(seed)

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, standard deviation) of each arm's posterior."""
        precision = 1.0 / self.prior_std**2 + self.counts / self.noise_std**2
        return (self.sums / self.noise_std**2) / precision, 1.0 / np.sqrt(precision)

    def means(self) -> np.ndarray:
        return self.posterior()[0]

    def propose(self, n: int, available: np.ndarray | None = None) -> np.ndarray:
        """The n available arms whose posterior draws are largest."""
        ok = _mask(available, self.n_arms)
        mean, std = self.posterior()
        draws = mean + std * self.rng.standard_normal(self.n_arms)
        order = np.argsort(-draws, kind="stable")
        return order[ok[order]][:n]


# --- from probes to budgets ----------------------------------------------------------------------------------


def arm_estimates(
    n_arms: int,
    arm_of: np.ndarray,
    values: np.ndarray,
    prior_strength: float,
    share: Any = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(shrunk mean per arm, probes per arm, pooled within-arm deviation) of signed probe scores.

    With a credit matrix, an arm's mean also counts its neighbours' probes, weighted as the rewards were:
    mean_k = (sum_j W[j, k] S_j + prior_strength * grand) / (sum_j W[j, k] n_j + prior_strength).

    Args:
        n_arms: K.
        arm_of: the arm of each probed row.
        values: its signed expensive score (higher is better; NaN rows are ignored).
        prior_strength: pseudo-rows at the mean of all probes added to each arm's mean.
        share: [K, K] credit matrix from `neighbour_weights` (default: each arm its own probes only).
    """
    ok = np.isfinite(values)
    arm_of, values = arm_of[ok], values[ok]
    counts = np.bincount(arm_of, minlength=n_arms).astype(np.float64)
    if len(values) == 0:
        return np.zeros(n_arms), counts, 1.0
    grand = float(values.mean())
    sums = np.bincount(arm_of, weights=values, minlength=n_arms)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), grand)
    resid = values - means[arm_of]
    dof = len(values) - int((counts > 0).sum())
    sigma = math.sqrt(float((resid**2).sum()) / dof) if dof > 0 else 0.0
    if not sigma > 0:
        sigma = float(values.std()) or 1.0
    if share is not None:
        share = credit_matrix(share, n_arms)
        sums, credited = share.spread(sums), share.spread(counts)
    else:
        credited = counts
    with np.errstate(invalid="ignore", divide="ignore"):
        shrunk = (sums + prior_strength * grand) / (credited + prior_strength)
    shrunk = np.where(credited + prior_strength > 0, shrunk, grand)
    return shrunk, counts, sigma


def estimated_cut(mu: np.ndarray, sigma: float, sizes: np.ndarray, budget: int) -> tuple[float, np.ndarray]:
    """(tau, expected rows per arm above tau) with sum_k sizes_k P(N(mu_k, sigma^2) > tau) = budget (bisection)."""
    from scipy.special import ndtr

    sizes = np.asarray(sizes, dtype=np.float64)
    if budget <= 0 or sizes.sum() == 0:
        return float("inf"), np.zeros_like(sizes)
    if budget >= sizes.sum():
        return float("-inf"), sizes.copy()
    lo, hi = float(mu.min()) - 12 * sigma, float(mu.max()) + 12 * sigma
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (sizes * ndtr((mu - mid) / sigma)).sum() > budget:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    return tau, sizes * ndtr((mu - tau) / sigma)

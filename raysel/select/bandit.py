"""Budget allocation by a bandit over the FAISS clusters: probe a few rows with an expensive scorer, spend where it pays.

Running an expensive scorer (gradient influence, EL2N, VoG) on every row costs what the cheap
pass costs a hundred times over. The `bandit` policy treats each cluster as an arm (EQUAL, arXiv
2505.12250; Quad, arXiv 2409.16986): every round it picks some arms, scores `per_arm` unprobed rows
of each with the expensive scorer (nearest to the centroid first, or at random), and turns the mean
score into a reward that updates the arms' statistics. It stops at a round limit, at a probe budget
(a fraction of the corpus the expensive scorer may touch), when every row is probed, or, with
`allocate: plays`, when the plays have drawn the whole selection budget.

The policies are plain Python, seeded, with `propose()` / `update()` / `state_dict()` / `load_state_dict()`:

    UCBPolicy       score_k = S_k / C_k + alpha * sqrt(2 ln(sum_j C_j) / (C_k + 1)); unplayed arms first.
                    A reward r on arm a is also credited to every arm b whose centroid lies within
                    `radius` of a's (d = Euclidean distance of the unit centroids): S_b += w r, C_b += w,
                    w = 1 - d / radius (Quad) or w = 1 (EQUAL).
    EXP3SPolicy     p_k = (1 - gamma) w_k / sum_j w_j + gamma / K (LEAD, arXiv 2505.07437; Exp3.S of Auer et
                    al. 2002): n arms are drawn from p without replacement; the played arm's weight grows by
                    exp(eta r_hat) with r_hat = r / min(1, n p_k) and eta = gamma / K unless set, and every
                    weight gets (e mix / K) sum_j w_j, which lets a forgotten arm come back.
    ThompsonPolicy  Gaussian Thompson sampling: a N(0, prior_std^2) prior on each arm's mean reward and
                    N(mean, noise_std^2) rewards; the n arms with the largest posterior draws. Credits neighbours
                    like UCB.

The reward of an arm in a round is (mean expensive score of its probed rows - offset) / scale; with no
offset and scale configured they are the mean and standard deviation of the first round's scores, so
the rewards are z-scores of the corpus and alpha = 1 means what it says.

`BanditRun` is one run's rounds (which rows each arm has left, what was probed, the reward
history). `BanditAllocator` is the thin Ray actor that owns a `BanditRun` and writes its state to the
run's work dir after every round (write then rename), so a killed run, started again with the same
corpus, clusters and bandit settings, continues from the last saved round. The stopping limits and the
allocation settings are not part of that key: raising `max_rounds` or `probe_budget` continues an
earlier run, and changing how the probes are used reuses them.

The output is a budget per cluster (`allocate`):
    estimate  (default) each cluster's expensive score is modelled as N(mu_k, sigma^2): mu_k is its probe mean
              shrunk towards the mean of all probes (`prior_strength` pseudo-rows), sigma the pooled
              within-cluster deviation. The cut tau solves sum_k size_k P(score > tau) = budget, and cluster k
              gets size_k P(score > tau) rows: what an exhaustive top-k would take from it, estimated.
    plays     budget in proportion to how often the bandit played each cluster (each play draws a batch, as
              in Quad and EQUAL); the rounds stop when the plays have drawn the selection budget.
Inside a cluster (`within`): `probe` keeps first the probed rows whose expensive score clears tau, then
the unprobed rows by the cheap `select.score` (at random without one), and last the probed rows below the
cut; `cheap` ranks by the cheap score alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.io import fs as rfs
from raysel.select import Candidates, Policy, Selection, largest_remainder, register_policy

# --- neighbour sharing ---------------------------------------------------------------------------------------


def neighbour_weights(centroids: np.ndarray, radius: float, mode: str) -> np.ndarray:
    """[K, K] credit matrix: row a says how much of arm a's reward each arm receives (1 on the diagonal).

    Args:
        centroids: [K, dim] cluster centroids, unit norm.
        radius: arms whose centroids lie closer than this (Euclidean) share rewards.
        mode: `quad` weighs a neighbour by 1 - d / radius, `equal` by 1, `none` shares nothing.
    """
    k = len(centroids)
    if mode == "none" or radius <= 0 or k == 0:
        return np.eye(k)
    c = np.asarray(centroids, dtype=np.float64)
    sq = (c * c).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * c @ c.T, 0.0))
    near = dist < radius
    weights = np.where(near, 1.0 - dist / radius, 0.0) if mode == "quad" else near.astype(np.float64)
    np.fill_diagonal(weights, 1.0)
    return weights


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
    share: np.ndarray
    rng: np.random.Generator

    def update(self, arms: np.ndarray | list[int], rewards: np.ndarray | list[float]) -> None:
        for a, r in zip(arms, rewards, strict=True):
            self.sums += self.share[int(a)] * float(r)
            self.counts += self.share[int(a)]

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

    def __init__(self, n_arms: int, *, alpha: float = 1.0, share: np.ndarray | None = None, seed: int = 0) -> None:
        self.n_arms = n_arms
        self.alpha = alpha
        self.share = np.eye(n_arms) if share is None else np.asarray(share, dtype=np.float64)
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
        share: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.n_arms = n_arms
        self.prior_std = prior_std
        self.noise_std = noise_std
        self.share = np.eye(n_arms) if share is None else np.asarray(share, dtype=np.float64)
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


# --- one run's rounds ----------------------------------------------------------------------------------------


class BanditRun:
    """The rounds of one bandit run: which rows each arm has left, what was probed, and the reward history.

    Ray-agnostic; `BanditAllocator` runs it inside an actor and persists `state_dict()` after every round.

    Args:
        policy: a UCBPolicy, EXP3SPolicy or ThompsonPolicy over len(queues) arms.
        queues: per arm, the candidate indices in the order they are to be probed.
        per_arm: rows probed per arm and round (m).
        arms_per_round: arms played per round (all of them when there are fewer).
        probe_limit: the most rows the expensive scorer may score, over all rounds.
        max_rounds: stop after this many rounds (None: no limit).
        fill_limit: stop once this many rows were probed (the selection budget, with `allocate: plays`).
        reward_sign: +1 when a high expensive score is valuable, -1 when a low one is.
        reward_offset: subtracted from the mean score (None: the first round's mean).
        reward_scale: divides it (None: the first round's standard deviation).

    Example:
        >>> run = BanditRun(UCBPolicy(2), [np.arange(5), np.arange(5, 9)], per_arm=2, arms_per_round=1,
        ...                 probe_limit=6)
        >>> proposal = run.propose()              # {arm: [candidate indices]}
        >>> run.record(proposal, {a: [0.3] * len(ix) for a, ix in proposal.items()})
    """

    def __init__(
        self,
        policy: UCBPolicy | EXP3SPolicy | ThompsonPolicy,
        queues: list[np.ndarray],
        *,
        per_arm: int,
        arms_per_round: int,
        probe_limit: int,
        max_rounds: int | None = None,
        fill_limit: int | None = None,
        reward_sign: float = 1.0,
        reward_offset: float | None = None,
        reward_scale: float | None = None,
    ) -> None:
        self.policy = policy
        self.queues = [np.asarray(q, dtype=np.int64) for q in queues]
        self.per_arm = per_arm
        self.arms_per_round = arms_per_round
        self.probe_limit = probe_limit
        self.max_rounds = max_rounds
        self.fill_limit = fill_limit
        self.reward_sign = reward_sign
        self.offset = reward_offset
        self.scale = reward_scale
        self.round = 0
        self.taken = np.zeros(len(queues), dtype=np.int64)
        self.probed: list[int] = []
        self.probe_scores: list[float] = []
        self.history: list[dict[str, Any]] = []

    @property
    def n_probed(self) -> int:
        return len(self.probed)

    def available(self) -> np.ndarray:
        return self.taken < np.array([len(q) for q in self.queues], dtype=np.int64)

    def stop_reason(self) -> str | None:
        """Why no further round runs, or None while one may."""
        if self.max_rounds is not None and self.round >= self.max_rounds:
            return f"round limit ({self.max_rounds})"
        if self.n_probed >= self.probe_limit:
            return f"probe budget ({self.probe_limit} rows)"
        if self.fill_limit is not None and self.n_probed >= self.fill_limit:
            return f"selection budget filled ({self.fill_limit} rows drawn)"
        if not self.available().any():
            return "every row probed"
        return None

    def propose(self) -> dict[int, list[int]] | None:
        """This round's arms and the unprobed rows to score in each, or None when the run has stopped."""
        if self.stop_reason() is not None:
            return None
        available = self.available()
        arms = self.policy.propose(min(self.arms_per_round, int(available.sum())), available)
        room = self.probe_limit - self.n_probed
        if self.fill_limit is not None:
            room = min(room, self.fill_limit - self.n_probed)
        proposal: dict[int, list[int]] = {}
        for arm in arms:
            arm = int(arm)
            take = min(self.per_arm, len(self.queues[arm]) - int(self.taken[arm]), room)
            if take <= 0:
                break
            proposal[arm] = self.queues[arm][self.taken[arm] : self.taken[arm] + take].tolist()
            room -= take
        return proposal

    def record(self, proposal: dict[int, list[int]], scores: dict[int, list[float]]) -> None:
        """Turn the probed rows' expensive scores into one reward per arm and update the policy."""
        signed = {int(a): self.reward_sign * np.asarray(scores[a], dtype=np.float64) for a in proposal}
        if self.offset is None or self.scale is None:
            first = np.concatenate(list(signed.values())) if signed else np.empty(0)
            first = first[np.isfinite(first)]
            if self.offset is None:
                self.offset = float(first.mean()) if len(first) else 0.0
            if self.scale is None:
                std = float(first.std()) if len(first) > 1 else 0.0
                self.scale = std if std > 0 else 1.0
        arms, rewards = [], []
        for a, values in signed.items():
            finite = values[np.isfinite(values)]
            if len(finite):  # an arm whose rows all failed to score teaches nothing
                arms.append(a)
                rewards.append((float(finite.mean()) - self.offset) / self.scale)
        self.policy.update(arms, rewards)
        for a, rows in proposal.items():
            self.taken[int(a)] += len(rows)
            self.probed.extend(int(r) for r in rows)
            self.probe_scores.extend(float(s) for s in scores[a])
        self.round += 1
        self.history.append(
            {
                "round": self.round,
                "arms": [int(a) for a in arms],
                "rewards": [round(r, 6) for r in rewards],
                "probed": sum(len(r) for r in proposal.values()),
            }
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "taken": self.taken.tolist(),
            "probed": list(self.probed),
            "probe_scores": [None if not math.isfinite(s) else s for s in self.probe_scores],
            "history": self.history,
            "offset": self.offset,
            "scale": self.scale,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["taken"]) != len(self.queues):
            raise ValueError(f"saved bandit state has {len(state['taken'])} arms, this run has {len(self.queues)}")
        self.round = int(state["round"])
        self.taken = np.asarray(state["taken"], dtype=np.int64)
        self.probed = [int(i) for i in state["probed"]]
        self.probe_scores = [float("nan") if s is None else float(s) for s in state["probe_scores"]]
        self.history = list(state["history"])
        self.offset, self.scale = state["offset"], state["scale"]
        self.policy.load_state_dict(state["policy"])


# --- the Ray actor -------------------------------------------------------------------------------------------


def save_state(uri: str, state: dict[str, Any]) -> None:
    """Write the state next to its final name, then move it there: a kill mid-write leaves the last round."""
    fs, path = rfs.resolve(uri)
    rfs.write_text(uri + ".partial", json.dumps(state))
    fs.move(path + ".partial", path)


def load_state(uri: str) -> dict[str, Any] | None:
    return json.loads(rfs.read_text(uri)) if rfs.exists(uri) else None


class BanditAllocator:
    """Owns a run's `BanditRun` in one Ray actor and persists its state after every round.

    A saved state at `state_uri` is loaded at start: the run continues from its last saved round. That
    also makes the actor restartable: Ray restarts it after its node is lost, it reloads the last saved
    round, and `record` (tagged with the round it answers) applies a retried call at most once.
    Start it with `BanditAllocator.start(run, state_uri)`, which returns the actor handle; the class
    itself is plain Python (tests call it directly).

    Args:
        run: the fresh run (its arms, queues, policy and limits).
        state_uri: where the state is kept (local path or s3://).
    """

    def __init__(self, run: BanditRun, state_uri: str) -> None:
        self.run = run
        self.state_uri = state_uri
        saved = load_state(state_uri)
        # Loading a state (the saved one, or the run's own) also gives the actor writable arrays: the ones Ray
        # deserialized the run with are read-only views of the object store.
        run.load_state_dict(saved if saved is not None else run.state_dict())
        self.started_at_round = run.round

    @classmethod
    def start(cls, run: BanditRun, state_uri: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raysel._internal.ray_stage import RESTARTABLE_ACTOR

        # The actor only does bookkeeping: it reserves no CPU, so it never starves the probe's scorer pool. It
        # prefers the driver's node, whose loss ends the run anyway, over a worker node that may be lost alone.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return ray.remote(num_cpus=0, scheduling_strategy=here, **RESTARTABLE_ACTOR)(cls).remote(run, state_uri)

    def propose(self) -> tuple[int, dict[int, list[int]] | None]:
        """(the round, its proposal); the proposal is None when the run has stopped."""
        return self.run.round, self.run.propose()

    def record(self, round_: int, proposal: dict[int, list[int]], scores: dict[int, list[float]]) -> int:
        """Record round `round_`'s scores and save; a retry of a round already saved changes nothing."""
        if round_ == self.run.round:
            self.run.record(proposal, scores)
            save_state(self.state_uri, self.run.state_dict())
        return self.run.round

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.run.state_dict(),
            "started_at_round": self.started_at_round,
            "stop_reason": self.run.stop_reason(),
        }


# --- from probes to budgets ----------------------------------------------------------------------------------


def arm_estimates(
    n_arms: int,
    arm_of: np.ndarray,
    values: np.ndarray,
    prior_strength: float,
    share: np.ndarray | None = None,
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
        sums, credited = share.T @ sums, share.T @ counts
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


# --- the policy ----------------------------------------------------------------------------------------------


class BanditParams(BaseModel):
    """Settings of the `bandit` policy (`select.params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Literal["ucb", "exp3s", "thompson"] = "ucb"
    probe_scorer: ScorerConfig = Field(
        default_factory=lambda: ScorerConfig(name="loss"),
        description="the expensive scorer the probes run (any registered scorer, with its own params)",
    )
    probe_order: Literal["desc", "asc"] = Field("desc", description="desc: a high expensive score is valuable")
    arms_per_round: int = Field(50, ge=1, description="clusters probed per round (all when there are fewer)")
    per_arm: int = Field(10, ge=1, description="rows probed per cluster and round")
    pick: Literal["nearest", "random"] = Field("nearest", description="which unprobed rows of a cluster go first")
    max_rounds: int | None = Field(None, ge=1)
    probe_budget: float = Field(0.1, gt=0, le=1, description="the fraction of the usable rows the probes may score")
    reward_offset: float | None = Field(None, description="default: the first round's mean score")
    reward_scale: float | None = Field(None, gt=0, description="default: the first round's standard deviation")
    alpha: float = Field(1.0, ge=0, description="ucb: weight of the exploration term")
    share: Literal["quad", "equal", "none"] = Field("quad", description="ucb/thompson: neighbour reward credit")
    radius: float = Field(0.5, ge=0, description="centroid distance (unit vectors) within which arms share")
    gamma: float = Field(0.1, gt=0, le=1, description="exp3s: uniform exploration share")
    mix: float = Field(0.01, ge=0, description="exp3s: Exp3.S weight sharing (alpha in Auer et al.)")
    eta: float | None = Field(None, gt=0, description="exp3s: weight learning rate; default gamma / K")
    prior_std: float = Field(1.0, gt=0, description="thompson: prior std of an arm's mean reward")
    noise_std: float = Field(1.0, gt=0, description="thompson: std of a round's reward")
    allocate: Literal["estimate", "plays"] = "estimate"
    prior_strength: float = Field(2.0, ge=0, description="estimate: pseudo-rows shrinking a cluster's probe mean")
    within: Literal["probe", "cheap"] = "probe"

    def round_settings(self) -> dict[str, Any]:
        """What determines the rounds (the key of the saved state): not the limits, not the allocation, not how
        the probe's actors are sized."""
        settings = self.model_dump(exclude={"max_rounds", "probe_budget", "allocate", "prior_strength", "within"})
        settings["probe_scorer"] = self.probe_scorer.model_dump(
            exclude={"actors", "resources", "threads", "batch_size"}
        )
        return settings


@register_policy("bandit")
class BanditPolicy(Policy):
    """Budgets per cluster from a bandit that probes clusters with an expensive scorer (module docstring).

    Reads the run context (`candidates.context`): the scored shards for the embeddings and the
    probed rows, and the work dir for the saved rounds. The manifest's `selection.bandit` records the
    rounds, the rows probed, the fraction of the corpus the expensive scorer touched and the rewards.
    """

    needs_score = False
    Params = BanditParams

    def select(self, candidates: Candidates, budget: int) -> Selection:
        from raysel.select.probe import Probe, ShardIndex, cluster_geometry

        params: BanditParams = self.config.typed_params()
        context = candidates.context
        if context is None:
            raise ConfigError(
                "select.policy: bandit needs the run context (scored shards, work dir); run it through raysel.pipeline"
            )
        n = len(candidates)
        arms, arm_of = np.unique(candidates.cluster, return_inverse=True)
        k = len(arms)
        index = ShardIndex.build(context.scores_uri, candidates.ids)
        centroids, sim = cluster_geometry(index, arm_of, k)
        queues = self._queues(arm_of, k, sim, params.pick)
        policy = self._policy(params, k, centroids)
        run = BanditRun(
            policy,
            queues,
            per_arm=params.per_arm,
            arms_per_round=params.arms_per_round,
            probe_limit=max(1, int(math.floor(params.probe_budget * n))),
            max_rounds=params.max_rounds,
            fill_limit=budget if params.allocate == "plays" else None,
            reward_sign=1.0 if params.probe_order == "desc" else -1.0,
            reward_offset=params.reward_offset,
            reward_scale=params.reward_scale,
        )
        key = self._state_key(candidates, params)
        state_uri = context.path(f"bandit-{key}", "state.json")
        started = time.perf_counter()
        summary = self._rounds(run, state_uri, lambda: Probe(params.probe_scorer, context, index))
        run.load_state_dict(summary["state"])
        probing_seconds = time.perf_counter() - started

        probed = np.asarray(run.probed, dtype=np.int64)
        values = run.reward_sign * np.asarray(run.probe_scores, dtype=np.float64)
        share = neighbour_weights(centroids, params.radius, params.share)
        mu, counts, sigma = arm_estimates(k, arm_of[probed], values, params.prior_strength, share)
        sizes = np.bincount(arm_of, minlength=k)
        tau, expected = estimated_cut(mu, sigma, sizes, budget)
        plays = np.zeros(k)
        for rnd in run.history:
            plays[rnd["arms"]] += 1
        weights = expected if params.allocate == "estimate" else plays
        quotas = largest_remainder(weights, budget, caps=sizes)
        selected, reasons, ranked_by = self._take(candidates, arm_of, arms, quotas, probed, values, tau, params)
        n_probed = len(probed)
        info = {
            "quotas": {int(arms[a]): int(q) for a, q in enumerate(quotas)},
            "bandit": {
                "algorithm": params.algorithm,
                "probe_scorer": params.probe_scorer.name,
                "rounds": run.round,
                "resumed_from_round": summary["started_at_round"],
                "rounds_this_run": run.round - summary["started_at_round"],
                "stop_reason": summary["stop_reason"],
                "examples_probed": n_probed,
                "probed_fraction": round(n_probed / n, 6) if n else 0.0,
                "probe_budget_rows": run.probe_limit,
                "reward_offset": run.offset,
                "reward_scale": run.scale,
                "reward_history": run.history,
                "allocate": params.allocate,
                "cut": None if not math.isfinite(tau) else round(run.reward_sign * tau, 6),
                "within": ranked_by,
                "arms": {
                    "cluster": arms.tolist(),
                    "size": sizes.tolist(),
                    "probed": counts.astype(int).tolist(),
                    "plays": plays.astype(int).tolist(),
                    "estimate": [round(run.reward_sign * float(m), 6) for m in mu],
                },
                "state": state_uri,
                "seconds": round(probing_seconds, 3),
            },
        }
        return Selection(selected, reasons, info)

    def _policy(self, params: BanditParams, k: int, centroids: np.ndarray) -> UCBPolicy | EXP3SPolicy | ThompsonPolicy:
        seed = self.config.seed
        if params.algorithm == "exp3s":
            return EXP3SPolicy(k, gamma=params.gamma, mix=params.mix, eta=params.eta, seed=seed)
        share = neighbour_weights(centroids, params.radius, params.share)
        if params.algorithm == "thompson":
            return ThompsonPolicy(k, prior_std=params.prior_std, noise_std=params.noise_std, share=share, seed=seed)
        return UCBPolicy(k, alpha=params.alpha, share=share, seed=seed)

    def _queues(self, arm_of: np.ndarray, k: int, sim: np.ndarray, pick: str) -> list[np.ndarray]:
        rng = np.random.default_rng(self.config.seed)
        if pick == "nearest":
            order = np.lexsort((np.arange(len(arm_of)), -sim))  # nearest first; ties in id order
        else:
            order = rng.permutation(len(arm_of))
        by_arm = order[np.argsort(arm_of[order], kind="stable")]
        bounds = np.searchsorted(arm_of[by_arm], np.arange(k + 1))
        return [by_arm[bounds[a] : bounds[a + 1]] for a in range(k)]

    def _state_key(self, candidates: Candidates, params: BanditParams) -> str:
        digest = hashlib.sha256()
        digest.update("\n".join(map(str, candidates.ids)).encode())
        digest.update(np.ascontiguousarray(candidates.cluster, dtype=np.int64).tobytes())
        settings = {"round_settings": params.round_settings(), "seed": self.config.seed}
        digest.update(rfs.settings_digest(settings).encode())  # files the probe names count by content
        return digest.hexdigest()[:16]

    def _rounds(self, run: BanditRun, state_uri: str, make_probe: Any) -> dict[str, Any]:
        """Drive the allocator actor: propose, score the proposed rows with the probe, record; until it stops."""
        import ray

        allocator = BanditAllocator.start(run, state_uri)
        probe = None
        try:
            while True:
                round_, proposal = ray.get(allocator.propose.remote())
                if not proposal:
                    break
                if probe is None:
                    probe = make_probe()
                rows = np.concatenate([np.asarray(v, dtype=np.int64) for v in proposal.values()])
                scores = probe.score(rows)
                by_arm, start = {}, 0
                for arm, ix in proposal.items():
                    by_arm[arm] = scores[start : start + len(ix)].tolist()
                    start += len(ix)
                ray.get(allocator.record.remote(round_, proposal, by_arm))
            return ray.get(allocator.summary.remote())
        finally:
            if probe is not None:
                probe.close()
            ray.kill(allocator)

    def _take(
        self,
        candidates: Candidates,
        arm_of: np.ndarray,
        arms: np.ndarray,
        quotas: np.ndarray,
        probed: np.ndarray,
        values: np.ndarray,
        tau: float,
        params: BanditParams,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Inside each cluster keep its quota: probed rows above the cut, then unprobed by the cheap score, then
        probed rows below the cut (`within: probe`); or by the cheap score alone (`within: cheap`)."""
        n = len(candidates)
        cheap_name = self.config.score if self.config.score in candidates.scores else None
        if cheap_name is not None:
            cheap = candidates.scores[cheap_name]
            secondary = np.where(np.isnan(cheap), -np.inf, cheap if self.config.order == "desc" else -cheap)
        else:  # no cheap score: a seeded random order
            secondary = np.random.default_rng(self.config.seed).random(n)
        tier = np.ones(n)
        probe_value = np.full(n, np.nan)
        if params.within == "probe" and len(probed):
            probe_value[probed] = values
            good = np.isfinite(probe_value) & (probe_value >= tau)
            tier[probed] = 0
            tier[good] = 2
            secondary = np.where(tier != 1, np.where(np.isfinite(probe_value), probe_value, -np.inf), secondary)
        order = np.lexsort((np.arange(n), -secondary, -tier, arm_of))
        position = np.empty(n, dtype=np.int64)
        starts = np.searchsorted(arm_of[order], np.arange(len(arms)))
        position[order] = np.arange(n) - starts[arm_of[order]]
        selected = position < quotas[arm_of]
        cheap_desc = cheap_name or "random order"
        ranked_by = f"probe score above the cut, then {cheap_desc}" if params.within == "probe" else cheap_desc
        sign = 1.0 if params.probe_order == "desc" else -1.0
        reasons = np.empty(n, dtype=object)
        reasons[selected] = ""
        for i in np.flatnonzero(~selected):
            a = arm_of[i]
            if tier[i] == 0:
                reasons[i] = (
                    f"probed: {params.probe_scorer.name} {sign * probe_value[i]:.4g} is on the wrong side of "
                    f"the cut; cluster {arms[a]} kept {quotas[a]}"
                )
            else:
                reasons[i] = f"outside the {quotas[a]} kept in cluster {arms[a]} (bandit budget; by {ranked_by})"
        return selected, reasons, ranked_by

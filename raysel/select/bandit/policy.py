"""The `bandit` selection policy: probe clusters with an expensive scorer, then a budget per cluster.

raysel/select/bandit/__init__.py describes the rounds, the rewards and the allocation.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.config import ScorerConfig
from raysel.errors import ConfigError
from raysel.io import fs as rfs
from raysel.select import Candidates, Policy, Selection, largest_remainder, register_policy
from raysel.select.bandit.algorithms import (
    EXP3SPolicy,
    ThompsonPolicy,
    UCBPolicy,
    arm_estimates,
    estimated_cut,
    neighbour_weights,
)
from raysel.select.bandit.allocator import BanditAllocator, BanditRun

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
        from raysel.io.shards import ShardIndex, cluster_geometry
        from raysel.select.bandit.probe import Probe

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

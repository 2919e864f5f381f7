"""The `bandit` selection policy: probe clusters with an expensive scorer, then a budget per cluster.

raysel/select/bandit/__init__.py describes the rounds, the rewards and the allocation.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
from raysel.select.bandit.queues import ProbeQueues, probe_order_key
from raysel.select.plan import CutService, Eligible, Plan, SelectionStats, Step

# --- the policy ----------------------------------------------------------------------------------------------


# Quad's values (arXiv 2409.16986 and its reference code; docs/bandit.md): 50 clusters × 10 rows a round, the
# reward the mean influence minus an offset (not divided by a spread), neighbour credit 1 − d / 0.2 within
# centroid distance 0.2, UCB with α = 1e-4. Quad clusters its corpus into ~10,000 clusters (`cluster.k`).
PRESETS: dict[str, dict[str, Any]] = {
    "quad": {
        "algorithm": "ucb",
        "arms_per_round": 50,
        "per_arm": 10,
        "reward_scale": 1.0,
        "share": "quad",
        "radius": 0.2,
        "alpha": 1e-4,
    },
}


class BanditParams(BaseModel):
    """Settings of the `bandit` policy (`select.params`). `preset: quad` fills in Quad's values; a setting given
    beside it wins."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["quad"] | None = Field(None, description="quad: Quad's settings (docs/bandit.md)")
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

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    def round_settings(self) -> dict[str, Any]:
        """What determines the rounds (the key of the saved state): not the limits, not the allocation, not how
        the probe's actors are sized."""
        settings = self.model_dump(exclude={"max_rounds", "probe_budget", "allocate", "prior_strength", "within"})
        settings["probe_scorer"] = self.probe_scorer.model_dump(
            exclude={"actors", "resources", "threads", "batch_size"}
        )
        return settings


@dataclass(frozen=True)
class BanditPlan(Plan):
    """The bandit's plan: one per-cluster cut over the rows nobody probed, and the probed rows, which the driver
    decided itself (id -> reason, "" when kept; as many as the rounds probed)."""

    decided: dict[str, str] = field(default_factory=dict)


@register_policy("bandit")
class BanditPolicy(Policy):
    """Budgets per cluster from a bandit that probes clusters with an expensive scorer (module docstring).

    `plan` (the pipeline's form): the probe queues come from one pass over the candidate rows (the
    first rows of each cluster by `centroid_sim`, the cosine to its pass-2 centroid, or by a seeded id
    hash), the rounds run on the driver with the probe's actors reading the rows they score, and the plan
    is the probed rows' decisions plus an exact per-cluster cut (by the cheap score) over the others.
    `select` is the same policy in memory, the slow reference. Reads the run context (`stats.context`,
    `candidates.context`): the scored shards and input files for the probed rows, the work dir for the
    saved rounds, the pass-2 centroids for the neighbour credit. The manifest's `selection.bandit`
    records the rounds, the rows probed, the fraction of the corpus the expensive scorer touched and the
    rewards.
    """

    needs_score = False
    reads = ("centroid_sim",)
    Params = BanditParams

    # --- plan / apply ------------------------------------------------------------------------------------------

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> BanditPlan:
        from raysel.select.bandit.probe import QueueProbe

        params: BanditParams = self.config.typed_params()
        context = stats.context
        if context is None or context.centroids is None:
            raise ConfigError(
                "select.policy: bandit needs the run context (scored shards, work dir, centroids); run it through "
                "raysel.pipeline"
            )
        arms = np.array(sorted(c for c, size in stats.cluster_sizes.items() if size > 0), dtype=np.int64)
        sizes = np.array([stats.cluster_sizes[int(c)] for c in arms], dtype=np.int64)
        k, n = len(arms), stats.usable
        queues = self._probe_queues(params, arms, sizes, cuts)
        centroids = np.asarray(context.centroids, dtype=np.float64)[arms]
        run = self._run(params, centroids, queues.codes(), n, budget)
        state_uri = context.path(f"bandit-{self._plan_key(queues, stats, centroids, params)}", "state.json")
        started = time.perf_counter()
        summary = self._rounds(run, state_uri, lambda: QueueProbe(params.probe_scorer, context, queues))
        run.load_state_dict(summary["state"])
        seconds = time.perf_counter() - started

        codes = np.asarray(run.probed, dtype=np.int64)
        probed_arm, probed_ids = queues.arm_of(codes), queues.id[queues.positions(codes)]
        values = run.reward_sign * np.asarray(run.probe_scores, dtype=np.float64)
        alloc = self._allocate(params, run, probed_arm, values, sizes, centroids, budget)
        cheap = self.config.score if self.config.score in context.config.score_columns else None
        ranked_by = _ranked_by(params, cheap)
        decided: dict[str, str] = {}
        rest = alloc["quotas"].copy()  # what the cut over the unprobed rows keeps, per arm
        probed_in = np.zeros(k, dtype=np.int64)
        if params.within == "probe" and len(codes):
            decided, rest = self._decide_probed(
                params,
                arms=arms,
                sizes=sizes,
                alloc=alloc,
                probed_arm=probed_arm,
                probed_ids=probed_ids,
                values=values,
                raw_scores=run.probe_scores,
                ranked_by=ranked_by,
            )
            probed_in = np.bincount(probed_arm, minlength=k)
        step = Step(
            score=cheap,
            order=self.config.order,
            group_by="cluster",
            quotas={int(c): int(q) for c, q in zip(arms, rest, strict=True)},
            seed=self.config.seed,
            eligible=Eligible(not_ids=frozenset(decided)),
        )
        step = cuts.find(step, [], {int(c): int(s - p) for c, s, p in zip(arms, sizes, probed_in, strict=True)})
        info = self._info(
            params,
            run,
            summary,
            arms=arms,
            sizes=sizes,
            alloc=alloc,
            ranked_by=ranked_by,
            usable=n,
            state_uri=state_uri,
            seconds=seconds,
        )
        return BanditPlan((step,), info, decided=decided)

    def _probe_queues(
        self, params: BanditParams, arms: np.ndarray, sizes: np.ndarray, cuts: CutService
    ) -> ProbeQueues:
        """One pass over the candidate rows: per cluster, as many rows as the rounds can probe in it, in order."""
        probe_limit = _probe_limit(params, int(sizes.sum()))
        cap = probe_limit if params.max_rounds is None else min(probe_limit, params.per_arm * params.max_rounds)
        caps = {int(c): int(min(size, cap)) for c, size in zip(arms, sizes, strict=True)}
        cuts.passes += 1
        return ProbeQueues.build(cuts.runner, arms=arms, caps=caps, pick=params.pick, seed=self.config.seed)

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        (kept,) = plan.kept(batch)
        quotas, ranked_by = plan.info["quotas"], plan.info["bandit"]["within"]
        reasons = np.array(
            [
                "" if k else f"outside the {quotas.get(int(c), 0)} kept in cluster {c} (bandit budget; by {ranked_by})"
                for k, c in zip(kept, batch["cluster"], strict=True)
            ],
            dtype=object,
        )
        decided = getattr(plan, "decided", {})
        if decided:
            for i, row_id in enumerate(batch["id"]):
                why = decided.get(row_id)
                if why is not None:
                    kept[i], reasons[i] = why == "", why
        return kept, reasons

    def _decide_probed(
        self,
        params: BanditParams,
        *,
        arms: np.ndarray,
        sizes: np.ndarray,
        alloc: dict[str, Any],
        probed_arm: np.ndarray,
        probed_ids: np.ndarray,
        values: np.ndarray,
        raw_scores: list[float],
        ranked_by: str,
    ) -> tuple[dict[str, str], np.ndarray]:
        """({probed id: reason}, rows per arm left to the unprobed rows). In a cluster the probed rows above the
        cut come first (best probe score first), then the unprobed ones, then the probed rows below the cut: as
        `select` ranks them, ties by id."""
        quotas, tau = alloc["quotas"], alloc["tau"]
        rest = quotas.copy()
        decided: dict[str, str] = {}
        raw = np.asarray(raw_scores, dtype=np.float64)
        key = np.where(np.isfinite(values), -values, np.inf)
        ids = probed_ids.astype(str)
        for a in np.unique(probed_arm):
            mine = np.flatnonzero(probed_arm == a)
            good = np.isfinite(values[mine]) & (values[mine] >= tau)
            above = mine[good][np.lexsort((ids[mine[good]], key[mine[good]]))]
            below = mine[~good][np.lexsort((ids[mine[~good]], key[mine[~good]]))]
            q = int(quotas[a])
            from_above = min(q, len(above))
            rest[a] = min(q - from_above, int(sizes[a]) - len(mine))
            from_below = q - from_above - rest[a]
            outside = f"outside the {q} kept in cluster {arms[a]} (bandit budget; by {ranked_by})"
            for j, i in enumerate(above):
                decided[ids[i]] = "" if j < from_above else outside
            for j, i in enumerate(below):
                decided[ids[i]] = "" if j < from_below else _wrong_side(params, raw[i], arms[a], q)
        return decided, rest

    def _plan_key(
        self, queues: ProbeQueues, stats: SelectionStats, centroids: np.ndarray, params: BanditParams
    ) -> str:
        """What determines the rounds of a planned run: the candidates (an order-independent digest of their ids and
        clusters), the centroids, the round settings and the seed. Not the limits: a larger cap continues."""
        settings = {
            "form": "plan",
            "candidates": queues.digest,
            "usable": stats.usable,
            "clusters": sorted(stats.cluster_sizes.items()),
            "centroids": hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float64).tobytes()).hexdigest(),
            "round_settings": params.round_settings(),
            "seed": self.config.seed,
        }
        return rfs.settings_digest(settings)[:16]  # files the probe names count by content

    # --- the in-memory reference -------------------------------------------------------------------------------

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
        if context.centroids is not None and candidates.centroid_sim is not None:  # pass 2's, as `plan` uses
            centroids = np.asarray(context.centroids, dtype=np.float64)[arms]
            sim = np.asarray(candidates.centroid_sim, dtype=np.float64)
        else:  # recomputed: the mean member embedding of each cluster
            centroids, sim = cluster_geometry(index, arm_of, k)
        key = probe_order_key(np.asarray(candidates.ids).astype(str), sim, params.pick, self.config.seed)
        run = self._run(params, centroids, self._queues(arm_of, k, key), n, budget)
        state_uri = context.path(f"bandit-{self._state_key(candidates, params)}", "state.json")
        started = time.perf_counter()
        summary = self._rounds(run, state_uri, lambda: Probe(params.probe_scorer, context, index))
        run.load_state_dict(summary["state"])
        seconds = time.perf_counter() - started

        probed = np.asarray(run.probed, dtype=np.int64)
        values = run.reward_sign * np.asarray(run.probe_scores, dtype=np.float64)
        sizes = np.bincount(arm_of, minlength=k)
        alloc = self._allocate(params, run, arm_of[probed], values, sizes, centroids, budget)
        selected, reasons, ranked_by = self._take(
            candidates, arm_of, arms, alloc["quotas"], probed, values, alloc["tau"], params
        )
        info = self._info(
            params,
            run,
            summary,
            arms=arms,
            sizes=sizes,
            alloc=alloc,
            ranked_by=ranked_by,
            usable=n,
            state_uri=state_uri,
            seconds=seconds,
        )
        return Selection(selected, reasons, info)

    # --- shared by both forms ----------------------------------------------------------------------------------

    def _run(self, params: BanditParams, centroids: np.ndarray, queues: list[np.ndarray], n: int, budget: int):
        return BanditRun(
            self._policy(params, len(queues), centroids),
            queues,
            per_arm=params.per_arm,
            arms_per_round=params.arms_per_round,
            probe_limit=_probe_limit(params, n),
            max_rounds=params.max_rounds,
            fill_limit=budget if params.allocate == "plays" else None,
            reward_sign=1.0 if params.probe_order == "desc" else -1.0,
            reward_offset=params.reward_offset,
            reward_scale=params.reward_scale,
        )

    def _allocate(
        self,
        params: BanditParams,
        run: BanditRun,
        probed_arm: np.ndarray,
        values: np.ndarray,
        sizes: np.ndarray,
        centroids: np.ndarray,
        budget: int,
    ) -> dict[str, Any]:
        """The budget per arm from the probes (`allocate`), the estimated cut and what the manifest shows."""
        k = len(sizes)
        share = neighbour_weights(centroids, params.radius, params.share)
        mu, counts, sigma = arm_estimates(k, probed_arm, values, params.prior_strength, share)
        tau, expected = estimated_cut(mu, sigma, sizes, budget)
        plays = np.zeros(k)
        for rnd in run.history:
            plays[rnd["arms"]] += 1
        weights = expected if params.allocate == "estimate" else plays
        quotas = largest_remainder(weights, budget, caps=sizes)
        return {"quotas": quotas, "tau": tau, "mu": mu, "counts": counts, "plays": plays}

    def _info(
        self,
        params: BanditParams,
        run: BanditRun,
        summary: dict[str, Any],
        *,
        arms: np.ndarray,
        sizes: np.ndarray,
        alloc: dict[str, Any],
        ranked_by: str,
        usable: int,
        state_uri: str,
        seconds: float,
    ) -> dict[str, Any]:
        """The manifest's `selection.quotas` and `selection.bandit`."""
        n = usable
        n_probed = len(run.probed)
        tau = alloc["tau"]
        return {
            "quotas": {int(arms[a]): int(q) for a, q in enumerate(alloc["quotas"])},
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
                    "cluster": [int(c) for c in arms],
                    "size": [int(s) for s in sizes],
                    "probed": alloc["counts"].astype(int).tolist(),
                    "plays": alloc["plays"].astype(int).tolist(),
                    "estimate": [round(run.reward_sign * float(m), 6) for m in alloc["mu"]],
                },
                "state": state_uri,
                "seconds": round(seconds, 3),
            },
        }

    def _policy(self, params: BanditParams, k: int, centroids: np.ndarray) -> UCBPolicy | EXP3SPolicy | ThompsonPolicy:
        seed = self.config.seed
        if params.algorithm == "exp3s":
            return EXP3SPolicy(k, gamma=params.gamma, mix=params.mix, eta=params.eta, seed=seed)
        share = neighbour_weights(centroids, params.radius, params.share)
        if params.algorithm == "thompson":
            return ThompsonPolicy(k, prior_std=params.prior_std, noise_std=params.noise_std, share=share, seed=seed)
        return UCBPolicy(k, alpha=params.alpha, share=share, seed=seed)

    def _queues(self, arm_of: np.ndarray, k: int, key: np.ndarray) -> list[np.ndarray]:
        """Per arm, its candidates in probing order: by `key` (probe_order_key), ties by id (candidate order)."""
        order = np.lexsort((np.arange(len(arm_of)), key))
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
        ranked_by = _ranked_by(params, cheap_name)
        sign = 1.0 if params.probe_order == "desc" else -1.0
        reasons = np.empty(n, dtype=object)
        reasons[selected] = ""
        for i in np.flatnonzero(~selected):
            a = arm_of[i]
            if tier[i] == 0:
                reasons[i] = _wrong_side(params, sign * probe_value[i], arms[a], quotas[a])
            else:
                reasons[i] = f"outside the {quotas[a]} kept in cluster {arms[a]} (bandit budget; by {ranked_by})"
        return selected, reasons, ranked_by


def _probe_limit(params: BanditParams, usable: int) -> int:
    """The most rows the probes may score: `probe_budget` of the usable rows, at least one."""
    return max(1, int(math.floor(params.probe_budget * usable)))


def _ranked_by(params: BanditParams, cheap: str | None) -> str:
    cheap_desc = cheap or "random order"
    return f"probe score above the cut, then {cheap_desc}" if params.within == "probe" else cheap_desc


def _wrong_side(params: BanditParams, score: float, cluster: Any, quota: Any) -> str:
    return (
        f"probed: {params.probe_scorer.name} {score:.4g} is on the wrong side of the cut; cluster {cluster} "
        f"kept {quota}"
    )

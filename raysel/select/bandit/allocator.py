"""One bandit run's rounds (`BanditRun`, plain Python) and the Ray actor that owns them (`BanditAllocator`).

The actor writes the run's state to the work dir after every round (write, then rename), so a killed run,
started again with the same corpus, clusters and bandit settings, continues from its last saved round.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from raysel.io import fs as rfs
from raysel.select.bandit.algorithms import EXP3SPolicy, ThompsonPolicy, UCBPolicy

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

"""The bandit's probe queues built block by block (raysel/select/bandit/queues.py) against the in-memory order the
`select` form probes in, and the queue codes a saved run relies on."""

from __future__ import annotations

import numpy as np
import pytest

from raysel.config import SelectConfig
from raysel.select.bandit import BanditPolicy
from raysel.select.bandit.queues import ProbeQueues, probe_order_key
from raysel.select.plan import ArrayBlocks

N, K = 500, 7


def _batch(ties: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    sim = rng.integers(0, 5, N) / 5.0 if ties else rng.random(N)
    ids = np.array(sorted(f"doc-{i:04d}" for i in rng.permutation(N)), dtype=object)
    return {
        "id": ids,
        "cluster": rng.choice([0, 2, 3, 5, 6, 8, 9], N).astype(np.int32),
        "source": np.array([f"f{i % 3}.jsonl" for i in range(N)], dtype=object),
        "row": np.arange(N),
        "centroid_sim": sim.astype(np.float32),
    }


@pytest.mark.parametrize("pick", ["nearest", "random"])
@pytest.mark.parametrize("ties", [False, True])
def test_block_queues_are_the_in_memory_order_cut_at_the_cap(pick, ties):
    batch = _batch(ties)
    arms, arm_of = np.unique(batch["cluster"], return_inverse=True)
    sizes = np.bincount(arm_of)
    cap = 9
    caps = {int(c): int(min(s, cap)) for c, s in zip(arms, sizes, strict=True)}
    # shuffled blocks: the queues must not depend on the order rows arrive in
    order = np.random.default_rng(1).permutation(N)
    runner = ArrayBlocks({c: v[order] for c, v in batch.items()}, blocks=6)
    queues = ProbeQueues.build(runner, arms=arms.astype(np.int64), caps=caps, pick=pick, seed=3)

    policy = BanditPolicy(SelectConfig(budget=10, policy="bandit", seed=3))
    key = probe_order_key(batch["id"].astype(str), batch["centroid_sim"].astype(np.float64), pick, 3)
    reference = policy._queues(arm_of, len(arms), key)  # what `select` probes, by candidate index
    for a, codes in enumerate(queues.codes()):
        got = queues.id[queues.positions(codes)].tolist()
        assert got == batch["id"][reference[a][:cap]].tolist()
        assert (queues.arm_of(codes) == a).all()
    assert len(queues) == sum(caps.values())


def test_codes_survive_a_larger_cap_and_the_digest_ignores_block_order():
    batch = _batch(False)
    arms = np.unique(batch["cluster"]).astype(np.int64)

    def build(cap, blocks, seed):
        order = np.random.default_rng(seed).permutation(N)
        runner = ArrayBlocks({c: v[order] for c, v in batch.items()}, blocks=blocks)
        return ProbeQueues.build(runner, arms=arms, caps={int(c): cap for c in arms}, pick="nearest", seed=0)

    small, large = build(3, 4, 0), build(8, 9, 1)
    for codes in small.codes():  # a saved round's codes name the same rows when a later run has longer queues
        assert small.id[small.positions(codes)].tolist() == large.id[large.positions(codes)].tolist()
    assert small.digest == large.digest
    moved = 9 if batch["cluster"][0] != 9 else 8
    other = {**batch, "cluster": np.where(np.arange(N) == 0, moved, batch["cluster"]).astype(np.int32)}
    changed = ProbeQueues.build(
        ArrayBlocks(other, 4), arms=arms, caps={int(c): 3 for c in arms}, pick="nearest", seed=0
    )
    assert changed.digest != small.digest  # one row in another cluster: another run

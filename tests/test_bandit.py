"""The bandit policies against hand-computed answers, the round bookkeeping, and `select.policy: bandit` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysel.select.bandit import (
    BanditAllocator,
    BanditRun,
    EXP3SPolicy,
    ThompsonPolicy,
    UCBPolicy,
    arm_estimates,
    estimated_cut,
    neighbour_weights,
)

# --- UCB -----------------------------------------------------------------------------------------------------


def test_ucb_score_is_the_formula_of_the_issue():
    ucb = UCBPolicy(3, alpha=0.5)
    ucb.sums[:] = [2.0, 1.0, 0.0]
    ucb.counts[:] = [4.0, 1.0, 0.0]
    total = 5.0
    expected = [
        2.0 / 4.0 + 0.5 * math.sqrt(2 * math.log(total) / 5.0),
        1.0 / 1.0 + 0.5 * math.sqrt(2 * math.log(total) / 2.0),
        math.inf,  # never credited: played first
    ]
    assert ucb.scores() == pytest.approx(expected)
    assert ucb.propose(3).tolist() == [2, 1, 0]
    assert ucb.propose(3, available=np.array([True, True, False])).tolist() == [1, 0]


def test_ucb_ties_follow_the_seed():
    first = [UCBPolicy(6, seed=7).propose(6).tolist() for _ in range(2)]
    assert first[0] == first[1]  # same seed, same order
    orders = {tuple(UCBPolicy(6, seed=s).propose(6).tolist()) for s in range(10)}
    assert len(orders) > 1  # all six tie at +inf: the seed decides


def test_neighbour_weights_quad_and_equal():
    # unit vectors at 0, 20 and 90 degrees: d(0, 20deg) = 2 sin(10deg) = 0.347, d(0, 90deg) = sqrt(2)
    angles = np.radians([0.0, 20.0, 90.0])
    c = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    d01 = 2 * math.sin(math.radians(10))
    quad = neighbour_weights(c, radius=0.5, mode="quad").toarray()
    assert quad[0, 1] == pytest.approx(1 - d01 / 0.5) and quad[1, 0] == pytest.approx(1 - d01 / 0.5)
    assert quad[0, 2] == 0 and quad[1, 2] == 0
    assert np.diag(quad).tolist() == [1.0, 1.0, 1.0]
    equal = neighbour_weights(c, radius=0.5, mode="equal").toarray()
    assert equal[0, 1] == 1.0 and equal[0, 2] == 0.0
    assert np.array_equal(neighbour_weights(c, radius=0.5, mode="none").toarray(), np.eye(3))


def test_neighbour_weights_rows_equal_the_dense_matrix():
    """Rows computed when used, a block at a time (more arms here than one block): the same weights as the dense
    K x K formula, and W.T @ x the same as with the dense matrix."""
    rng = np.random.default_rng(4)
    c = rng.normal(size=(700, 6))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(2 - 2 * c @ c.T, 0.0))
    x = np.where(rng.random(700) < 0.3, rng.normal(size=700), 0.0)
    for mode, dense in (("quad", np.where(dist < 0.6, 1 - dist / 0.6, 0.0)), ("equal", (dist < 0.6) * 1.0)):
        np.fill_diagonal(dense, 1.0)
        share = neighbour_weights(c, radius=0.6, mode=mode)
        np.testing.assert_allclose(share.toarray(), dense, atol=1e-9)
        np.testing.assert_allclose(share.row(5), dense[5], atol=1e-9)
        np.testing.assert_allclose(share.spread(x), dense.T @ x, atol=1e-9)


def test_ten_thousand_arms_that_all_share_need_no_k_by_k_matrix():
    """Quad's 10,000 clusters, every pair within the radius (as on a random encoder): the UCB updates and the
    arm estimates allocate O(K x block), far below the 800 MB of one dense K x K matrix."""
    import tracemalloc

    k = 10_000
    rng = np.random.default_rng(5)
    c = rng.normal(size=(k, 8))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    tracemalloc.start()
    try:
        share = neighbour_weights(c, radius=2.5, mode="equal")  # every pair: W is all ones
        ucb = UCBPolicy(k, share=share)
        ucb.update([3, 9_999], [1.0, 3.0])
        arm_of = rng.integers(0, k, size=400)
        values = rng.normal(size=400)
        mu, counts, _ = arm_estimates(k, arm_of, values, prior_strength=1.0, share=share)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 120 * 2**20, peak / 2**20
    assert ucb.counts.tolist() == [2.0] * k and ucb.sums.tolist() == [4.0] * k
    grand = values.mean()
    np.testing.assert_allclose(mu, (values.sum() + grand) / (400 + 1))  # every arm credited with every probe


def test_ucb_credits_neighbours():
    share = np.array([[1.0, 0.25, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ucb = UCBPolicy(3, share=share)
    ucb.update([0], [2.0])
    ucb.update([2], [-1.0])
    assert ucb.sums.tolist() == [2.0, 0.5, -1.0]
    assert ucb.counts.tolist() == [1.0, 0.25, 1.0]


def test_ucb_finds_the_best_arm():
    rng = np.random.default_rng(0)
    means = np.array([0.1, 0.3, 0.9, 0.2, 0.5])
    ucb = UCBPolicy(5, alpha=0.5, seed=1)
    plays = np.zeros(5)
    for _ in range(300):
        (arm,) = ucb.propose(1)
        ucb.update([arm], [means[arm] + 0.3 * rng.standard_normal()])
        plays[arm] += 1
    assert plays.argmax() == 2 and plays[2] > 0.6 * plays.sum()


# --- EXP3-S --------------------------------------------------------------------------------------------------


def test_exp3s_probabilities_and_update_by_hand():
    exp3 = EXP3SPolicy(3, gamma=0.3, mix=0.01, seed=0)
    assert exp3.probabilities() == pytest.approx([1 / 3] * 3)
    exp3.last_probs, exp3.last_n = exp3.probabilities(), 1
    exp3.update([0], [1.0])
    # x_hat = 1 / (1/3) = 3; w0 = exp(0.3 * 3 / 3) + e * 0.01 / 3 * 3; w1 = w2 = 1 + e * 0.01
    w = np.array([math.exp(0.3) + math.e * 0.01, 1 + math.e * 0.01, 1 + math.e * 0.01])
    assert exp3.probabilities() == pytest.approx(0.7 * w / w.sum() + 0.3 / 3)
    # over the available arms only
    p = exp3.probabilities(np.array([True, False, True]))
    assert p[1] == 0 and p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(0.7 * w[0] / (w[0] + w[2]) + 0.3 / 2)


def test_exp3s_draws_follow_p():
    exp3 = EXP3SPolicy(3, gamma=0.3, seed=3)
    exp3.log_weights = np.log(np.array([4.0, 1.0, 1.0]))
    p = exp3.probabilities()
    counts = np.bincount([exp3.propose(1)[0] for _ in range(20000)], minlength=3) / 20000
    assert counts == pytest.approx(p, abs=0.012)


# --- Thompson ------------------------------------------------------------------------------------------------


def test_thompson_posterior_by_hand():
    ts = ThompsonPolicy(2, prior_std=2.0, noise_std=0.5)
    ts.update([0, 0, 1], [1.0, 2.0, -1.0])
    precision0 = 1 / 4 + 2 / 0.25
    precision1 = 1 / 4 + 1 / 0.25
    mean, std = ts.posterior()
    assert mean == pytest.approx([(3.0 / 0.25) / precision0, (-1.0 / 0.25) / precision1])
    assert std == pytest.approx([1 / math.sqrt(precision0), 1 / math.sqrt(precision1)])


def test_thompson_picks_an_arm_as_often_as_its_posterior_says():
    ts = ThompsonPolicy(2, prior_std=1.0, noise_std=1.0, seed=5)
    ts.update([0, 1], [0.4, 0.0])
    mean, std = ts.posterior()
    p_first = 0.5 * (1 + math.erf((mean[0] - mean[1]) / math.sqrt(2 * (std[0] ** 2 + std[1] ** 2))))
    picks = np.mean([ts.propose(1)[0] == 0 for _ in range(20000)])
    assert picks == pytest.approx(p_first, abs=0.012)


# --- state, rounds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: UCBPolicy(4, alpha=0.7, seed=2),
        lambda: EXP3SPolicy(4, gamma=0.2, seed=2),
        lambda: ThompsonPolicy(4, seed=2),
    ],
)
def test_state_dict_round_trip_continues_identically(make):
    def play(policy, rounds, rng):
        out = []
        for _ in range(rounds):
            arms = policy.propose(2)
            policy.update(arms, rng.normal(size=len(arms)))
            out.append(arms.tolist())
        return out

    straight = make()
    whole = play(straight, 10, np.random.default_rng(0))
    first = make()
    rng = np.random.default_rng(0)
    head = play(first, 5, rng)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + play(resumed, 5, rng) == whole


def test_run_limits_offset_and_nan_scores():
    queues = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 30)]
    run = BanditRun(UCBPolicy(3, seed=0), queues, per_arm=3, arms_per_round=2, probe_limit=10)
    proposal = run.propose()
    assert len(proposal) == 2 and all(len(v) == 3 for v in proposal.values())
    scores = {a: [1.0, 2.0, float("nan")] if i == 0 else [3.0, 4.0, 5.0] for i, (a, _) in enumerate(proposal.items())}
    run.record(proposal, scores)
    finite = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert run.offset == pytest.approx(np.mean(finite)) and run.scale == pytest.approx(np.std(finite))
    first, second = proposal
    assert run.history[0]["rewards"] == pytest.approx(
        [(1.5 - run.offset) / run.scale, (4.0 - run.offset) / run.scale], abs=1e-6
    )
    # the probe budget cuts the next round short: 6 probed, 4 left
    assert sum(len(v) for v in run.propose().values()) == 4
    while (p := run.propose()) is not None:
        run.record(p, {a: [0.0] * len(v) for a, v in p.items()})
    assert run.n_probed == 10 and run.stop_reason() == "probe budget (10 rows)"
    assert len(set(run.probed)) == 10  # no row probed twice
    for q in queues:  # each arm probed its queue from the front
        mine = [i for i in run.probed if i in set(q.tolist())]
        assert mine == q[: len(mine)].tolist()


def test_run_stops_at_round_limit_and_fill_limit():
    queues = [np.arange(0, 50), np.arange(50, 100)]
    run = BanditRun(UCBPolicy(2), queues, per_arm=5, arms_per_round=2, probe_limit=100, max_rounds=3)
    while (p := run.propose()) is not None:
        run.record(p, {a: [1.0] * len(v) for a, v in p.items()})
    assert run.round == 3 and run.stop_reason() == "round limit (3)"
    run = BanditRun(UCBPolicy(2), queues, per_arm=5, arms_per_round=2, probe_limit=100, fill_limit=12)
    while (p := run.propose()) is not None:
        run.record(p, {a: [1.0] * len(v) for a, v in p.items()})
    assert run.n_probed == 12 and run.stop_reason().startswith("selection budget filled")


def test_allocator_persists_every_round_and_resumes(tmp_path):
    uri = str(tmp_path / "bandit" / "state.json")

    def fresh(max_rounds):
        queues = [np.arange(i * 20, (i + 1) * 20) for i in range(4)]
        policy = UCBPolicy(4, alpha=0.5, seed=3)
        return BanditRun(policy, queues, per_arm=2, arms_per_round=2, probe_limit=80, max_rounds=max_rounds)

    def drive(allocator):
        while (p := allocator.propose())[1] is not None:
            allocator.record(*p, {a: [float(np.sin(i)) for i in v] for a, v in p[1].items()})
        return allocator.summary()

    straight = drive(BanditAllocator(fresh(6), str(tmp_path / "other.json")))
    first = drive(BanditAllocator(fresh(3), uri))
    assert json.loads(open(uri).read())["round"] == 3
    again = BanditAllocator(fresh(6), uri)
    assert again.started_at_round == 3
    resumed = drive(again)
    assert resumed["state"] == straight["state"]
    assert first["state"]["history"] == straight["state"]["history"][:3]


def test_allocator_applies_a_retried_round_once(tmp_path):
    """A restarted actor reloads the saved state; the driver's retried `record` of a saved round is a no-op."""
    uri = str(tmp_path / "state.json")
    queues = [np.arange(i * 10, (i + 1) * 10) for i in range(3)]

    def fresh():
        return BanditRun(UCBPolicy(3, seed=1), queues, per_arm=2, arms_per_round=2, probe_limit=30)

    allocator = BanditAllocator(fresh(), uri)
    round_, proposal = allocator.propose()
    scores = {a: [1.0] * len(v) for a, v in proposal.items()}
    assert allocator.record(round_, proposal, scores) == 1
    restarted = BanditAllocator(fresh(), uri)  # what Ray's restart does: the constructor again, same arguments
    assert restarted.record(round_, proposal, scores) == 1  # the retry of round 0 is not applied twice
    assert restarted.summary()["state"] == allocator.summary()["state"]
    assert restarted.propose() == allocator.propose()


# --- from probes to budgets ----------------------------------------------------------------------------------


def test_arm_estimates_by_hand():
    arm_of = np.array([0, 0, 1, 1, 1])
    values = np.array([1.0, 3.0, 0.0, 1.0, np.nan])
    mu, counts, sigma = arm_estimates(3, arm_of, values, prior_strength=1.0)
    grand = np.mean([1.0, 3.0, 0.0, 1.0])
    assert counts.tolist() == [2, 2, 0]
    assert mu == pytest.approx([(2 * 2.0 + grand) / 3, (2 * 0.5 + grand) / 3, grand])
    # pooled within-arm deviation: residuals (-1, 1, -0.5, 0.5) over 4 - 2 degrees of freedom
    assert sigma == pytest.approx(math.sqrt((1 + 1 + 0.25 + 0.25) / 2))


def test_arm_estimates_borrow_from_neighbours_as_the_rewards_were_credited():
    arm_of = np.array([0, 0, 1])
    values = np.array([2.0, 4.0, -1.0])
    share = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])  # arm 2 (unprobed) sits near arm 0
    mu, counts, _ = arm_estimates(3, arm_of, values, prior_strength=1.0, share=share)
    grand = 5.0 / 3
    assert counts.tolist() == [2, 1, 0]
    assert mu == pytest.approx([(6.0 + grand) / 3, (-1.0 + grand) / 2, (0.5 * 6.0 + grand) / (0.5 * 2 + 1)])


def test_estimated_cut_solves_the_budget_equation():
    mu = np.array([0.0, 1.0, 2.5])
    sizes = np.array([100, 50, 10])
    tau, expected = estimated_cut(mu, 0.8, sizes, budget=30)

    def above(m):  # P(N(m, 0.8^2) > tau), with math.erf: independent of the scipy path
        return 0.5 * (1 - math.erf((tau - m) / (0.8 * math.sqrt(2))))

    assert sum(s * above(m) for s, m in zip(sizes, mu, strict=True)) == pytest.approx(30, abs=1e-6)
    assert expected == pytest.approx([s * above(m) for s, m in zip(sizes, mu, strict=True)])
    same = estimated_cut(np.zeros(3), 1.0, sizes, budget=32)[1]
    assert same == pytest.approx(sizes * 32 / sizes.sum())  # equal clusters: in proportion to size


# --- end to end ----------------------------------------------------------------------------------------------


def _run_config(corpus, out, work, **params):
    from raysel.config import parse_config

    return parse_config(
        {
            "input": {"path": str(corpus), "id_field": "id", "label_field": "topic"},
            "output": {"path": str(out)},
            "embed": {"max_tokens": 32},
            "scorers": [{"name": "entropy", "max_tokens": 32}],
            "cluster": {"k": 4, "seed": 0},
            "work_dir": str(work),
            "select": {
                "budget": 0.25,
                "policy": "bandit",
                "score": "entropy",
                "seed": 0,
                "params": {"probe_scorer": {"name": "loss", "max_tokens": 32, "batch_size": 8}, **params},
            },
        }
    )


@pytest.mark.slow
def test_bandit_policy_through_the_pipeline(ray_cluster, tmp_path):
    from conftest import bbc_sample, write_jsonl

    from raysel.pipeline import run

    corpus = write_jsonl(tmp_path / "corpus.jsonl", bbc_sample(40))
    cfg = _run_config(corpus, tmp_path / "out", tmp_path / "work", per_arm=2, arms_per_round=2, probe_budget=0.2)
    result = run(cfg)
    info = result.manifest["selection"]
    bandit = info["bandit"]
    assert result.counts["selected"] == 10
    assert bandit["examples_probed"] == 8 and bandit["probed_fraction"] == pytest.approx(0.2)
    assert bandit["rounds"] == 2 and bandit["stop_reason"] == "probe budget (8 rows)"
    assert [r["round"] for r in bandit["reward_history"]] == [1, 2]
    assert sum(info["quotas"].values()) == 10
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pandas()
    usable = ledger[ledger.status != "quarantined"]
    assert (usable.groupby("cluster").apply(lambda g: (g.status == "selected").sum()).to_dict()) == {
        int(c): q for c, q in info["quotas"].items()
    }
    # the probe scored only the probed rows, with the real loss scorer: its scores agree with pass-1 style loss
    state = json.loads(open(bandit["state"]).read())
    assert len(state["probed"]) == 8 and all(np.isfinite(state["probe_scores"]))
    assert all(2.0 < s < 12.0 for s in state["probe_scores"])  # mean token NLL of real English text


def test_state_key_ignores_limits_allocation_and_pool_size():
    from raysel.config import SelectConfig
    from raysel.select import Candidates
    from raysel.select.bandit import BanditPolicy

    cands = Candidates(ids=np.array(["a", "b", "c"], dtype=object), cluster=np.array([0, 1, 1]), scores={})

    def key(seed=0, **params):
        cfg = SelectConfig(budget=1, policy="bandit", seed=seed, params=params)
        return BanditPolicy(cfg)._state_key(cands, cfg.typed_params())

    base = key(per_arm=3)
    same = [
        key(per_arm=3, max_rounds=9),
        key(per_arm=3, probe_budget=0.5),
        key(per_arm=3, allocate="plays", within="cheap", prior_strength=5),
        key(per_arm=3, probe_scorer={"name": "loss", "batch_size": 4, "actors": 2}),
    ]
    assert same == [base] * 4
    different = [key(per_arm=4), key(seed=1, per_arm=3), key(per_arm=3, probe_scorer={"name": "entropy"})]
    assert base not in different and len(set(different)) == 3
    other = Candidates(ids=cands.ids, cluster=np.array([0, 0, 1]), scores={})
    cfg = SelectConfig(budget=1, policy="bandit", params={"per_arm": 3})
    assert BanditPolicy(cfg)._state_key(other, cfg.typed_params()) != base


# --- reading the scored shards (raysel/io/shards.py) -------------------------------------------------------------


def _shards(tmp_path, rng):
    """Two shard files in small row groups: 20 rows, one quarantined, one id repeated (first at a.jsonl:3)."""
    import pyarrow as pa

    folder = tmp_path / "scores"
    folder.mkdir()
    rows = []
    for i in range(20):
        rows.append(
            {
                "id": f"r{i:02d}",
                "reason": "bad line" if i == 7 else "",
                "source": "a.jsonl" if i < 12 else "b.jsonl",
                "row": i if i < 12 else i - 12,
                "value": float(i),
                "embedding": rng.normal(size=4).astype(np.float32).tolist(),
            }
        )
    rows[15] = {**rows[15], "id": "r03", "value": 99.0}  # a repeat of r03, later in (source, row) order
    order = rng.permutation(20)
    for name, part in (("0.parquet", order[:9]), ("1.parquet", order[9:])):
        pq.write_table(pa.Table.from_pylist([rows[i] for i in part]), folder / name, row_group_size=3)
    return folder, rows


def test_shard_index_reads_rows_by_id_in_the_asked_order(tmp_path):
    from raysel.io.shards import ShardIndex, cluster_geometry, embedding_matrix

    rng = np.random.default_rng(0)
    folder, rows = _shards(tmp_path, rng)
    usable = [r for i, r in enumerate(rows) if r["reason"] == "" and i != 15]
    ids = np.array(sorted(r["id"] for r in usable), dtype=object)
    index = ShardIndex.build(str(folder), ids)
    by_id = {r["id"]: r for r in usable}
    ask = rng.permutation(len(ids))[:11]
    table = index.read(ask)
    assert table.column("id").to_pylist() == ids[ask].tolist()
    assert table.column("value").to_pylist() == [by_id[i]["value"] for i in ids[ask]]  # r03: the first, not 99
    assert index.source[ids.tolist().index("r03")] == "a.jsonl" and index.row[ids.tolist().index("r03")] == 3
    seen = []
    for cand, part in index.stream(["id", "embedding"]):
        assert part.column("id").to_pylist() == ids[cand].tolist()
        seen += cand.tolist()
    assert sorted(seen) == list(range(len(ids)))
    # geometry against a direct computation
    arm_of = np.arange(len(ids)) % 3
    emb = embedding_matrix(index.read(np.arange(len(ids)), ["embedding"]).column("embedding"))
    assert emb == pytest.approx(np.array([by_id[i]["embedding"] for i in ids]))
    centroids, sim = cluster_geometry(index, arm_of, 3)
    for a in range(3):
        mean = emb[arm_of == a].mean(0)
        assert centroids[a] == pytest.approx(mean / np.linalg.norm(mean), abs=1e-6)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert sim == pytest.approx((unit * centroids[arm_of]).sum(1), abs=1e-6)


def test_shard_index_names_missing_ids(tmp_path):
    from raysel.errors import InputError
    from raysel.io.shards import ShardIndex

    folder, _ = _shards(tmp_path, np.random.default_rng(1))
    with pytest.raises(InputError, match=r"2 candidate ids \(e.g. 'r07'\) are not among the usable rows"):
        ShardIndex.build(str(folder), np.array(["r00", "r07", "zz"], dtype=object))

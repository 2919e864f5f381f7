"""MIG: the gains against a from-scratch brute force, lazy greedy == plain greedy, and the policy in a run."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from raysel.select import rank
from raysel.select.mig import gain, group_directions, mig_greedy, propagation_matrix, scaled_quality

EXP, EPS, THR = 0.8, 1e-2, 0.9


def _brute_vectors(quality, label_sets_per_row, label_emb, threshold):
    """v_x from the definition, with loops: q_x / |L_x| on each of x's labels, carried to linked labels by cos."""
    n_labels = len(label_emb)
    unit = [e / math.sqrt(sum(t * t for t in e)) for e in label_emb]
    cos = [
        [sum(a * b for a, b in zip(unit[i], unit[j], strict=True)) for j in range(n_labels)] for i in range(n_labels)
    ]
    vectors = []
    for q, labels in zip(quality, label_sets_per_row, strict=True):
        v = [0.0] * n_labels
        for lab in labels:
            for m in range(n_labels):
                link = 1.0 if m == lab else (cos[lab][m] if cos[lab][m] >= threshold else 0.0)
                v[m] += q / len(labels) * link
        vectors.append(v)
    return vectors


def _phi_total(vectors, chosen):
    total = [sum(vectors[i][m] for i in chosen) for m in range(len(vectors[0]))]
    return sum((w + EPS) ** EXP for w in total)


def _brute_greedy(vectors, budget):
    chosen, gains = [], []
    for _ in range(budget):
        base = _phi_total(vectors, chosen)
        best, best_gain = None, -math.inf
        for i in range(len(vectors)):
            if i in chosen:
                continue
            g = _phi_total(vectors, chosen + [i]) - base
            if g > best_gain + 1e-12:
                best, best_gain = i, g
        chosen.append(best)
        gains.append(best_gain)
    return chosen, gains


def _plain_greedy(quality, groups, directions, budget):
    """Greedy that evaluates every remaining row at every step (with the module's own gain function)."""
    weights = np.zeros(directions.shape[1])
    supports = [np.flatnonzero(d) for d in directions]
    left = list(range(len(quality)))
    picks, gains = [], []
    for _ in range(min(budget, len(quality))):
        values = [gain(weights, quality[i], directions[groups[i]], supports[groups[i]], EXP, EPS) for i in left]
        best = int(np.argmax(values))  # first maximum: the lower index
        i = left.pop(best)
        weights += quality[i] * directions[groups[i]]
        picks.append(i)
        gains.append(values[best])
    return np.array(picks), np.array(gains)


def _problem(n, n_labels, max_tags, seed, dim=3, near=True):
    rng = np.random.default_rng(seed)
    label_emb = rng.normal(size=(n_labels, dim))
    if near:  # make some labels near-duplicates so that links exist at threshold 0.9
        label_emb[1] = label_emb[0] + 0.1 * rng.normal(size=dim)
        label_emb[3] = label_emb[2] + 0.15 * rng.normal(size=dim)
    sets = [
        tuple(sorted(rng.choice(n_labels, size=rng.integers(1, max_tags + 1), replace=False).tolist()))
        for _ in range(n)
    ]
    quality = rng.uniform(0.05, 1.0, size=n)
    distinct = sorted(set(sets))
    groups = np.array([distinct.index(s) for s in sets])
    a = propagation_matrix(label_emb, THR)
    return quality, sets, label_emb, groups, group_directions(distinct, a), a


def test_propagation_links_only_close_labels():
    quality, sets, label_emb, groups, directions, a = _problem(10, 6, 2, seed=0)
    assert a[0, 1] >= THR and a[0, 1] == a[1, 0]
    assert ((a >= THR) | (a == 0)).all() and np.diag(a).tolist() == [1.0] * 6
    assert (a > 0).sum() > 6  # at least one link


def test_gains_equal_the_brute_force_on_a_tiny_case():
    quality, sets, label_emb, groups, directions, _ = _problem(9, 5, 2, seed=1)
    vectors = _brute_vectors(quality, sets, label_emb, THR)
    for i in range(len(quality)):  # row vectors: q_x times its set's direction
        assert quality[i] * directions[groups[i]] == pytest.approx(vectors[i], abs=1e-12)
    picks, gains, weights = mig_greedy(quality, groups, directions, 5, exponent=EXP, epsilon=EPS)
    brute_picks, brute_gains = _brute_greedy(vectors, 5)
    assert picks.tolist() == brute_picks
    assert gains == pytest.approx(brute_gains, rel=1e-9)
    # each recorded gain is Phi(S_t) - Phi(S_t-1) from scratch, and W is the sum of the chosen vectors
    for t in range(1, 6):
        delta = _phi_total(vectors, picks[:t].tolist()) - _phi_total(vectors, picks[: t - 1].tolist())
        assert gains[t - 1] == pytest.approx(delta, rel=1e-9)
    assert weights == pytest.approx(np.sum([vectors[i] for i in picks], axis=0))


def test_greedy_first_pick_is_the_best_single_row_and_is_diverse():
    # two labels; label 0 has the three best rows. A concave phi makes the second pick come from label 1.
    quality = np.array([1.0, 0.95, 0.9, 0.6])
    groups = np.array([0, 0, 0, 1])
    directions = np.eye(2)
    picks, _, _ = mig_greedy(quality, groups, directions, 2, exponent=0.5, epsilon=EPS)
    assert picks.tolist() == [0, 3]
    single = [max(range(4), key=lambda i: (quality[i] + EPS) ** 0.5 - EPS**0.5)]
    assert picks[0] == single[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lazy_greedy_equals_plain_greedy(seed):
    quality, sets, label_emb, groups, directions, _ = _problem(200, 15, 3, seed=seed)
    quality[::17] = quality[5]  # equal qualities: ties broken by index in both
    picks, gains, _ = mig_greedy(quality, groups, directions, 80, exponent=EXP, epsilon=EPS)
    plain_picks, plain_gains = _plain_greedy(quality, groups, directions, 80)
    assert picks.tolist() == plain_picks.tolist()
    assert np.array_equal(gains, plain_gains)
    assert (np.diff(gains) <= 1e-15).all()  # submodular: gains never grow


def test_whole_budget_and_beyond():
    quality, sets, label_emb, groups, directions, _ = _problem(30, 4, 2, seed=4)
    picks, _, _ = mig_greedy(quality, groups, directions, 100, exponent=EXP, epsilon=EPS)
    assert sorted(picks.tolist()) == list(range(30))


def test_scaled_quality():
    q = scaled_quality(np.array([2.0, 4.0, np.nan, 3.0]), "desc", 0.1)
    assert q == pytest.approx([0.1, 1.0, 0.0, 0.55])
    q = scaled_quality(np.array([2.0, 4.0, np.nan, 3.0]), "asc", 0.1)
    assert q == pytest.approx([1.0, 0.1, 0.0, 0.55])


def test_tiny_brute_force_on_all_subsets_for_budget_one_and_two():
    """With budget 1 the greedy is optimal: it must match the best single row over all rows."""
    quality, sets, label_emb, groups, directions, _ = _problem(7, 3, 2, seed=5, near=False)
    vectors = _brute_vectors(quality, sets, label_emb, THR)
    best = max(range(7), key=lambda i: _phi_total(vectors, [i]))
    assert mig_greedy(quality, groups, directions, 1, exponent=EXP, epsilon=EPS)[0].tolist() == [best]
    # budget 2: the greedy pair is within the (1 - 1/e) bound of the best pair
    opt = max(_phi_total(vectors, list(p)) for p in itertools.combinations(range(7), 2)) - _phi_total(vectors, [])
    picks = mig_greedy(quality, groups, directions, 2, exponent=EXP, epsilon=EPS)[0].tolist()
    got = _phi_total(vectors, picks) - _phi_total(vectors, [])
    assert got >= (1 - 1 / math.e) * opt


@pytest.mark.slow
def test_mig_policy_through_the_pipeline(ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    from conftest import bbc_sample, tiny_lm, write_jsonl

    from raysel.config import parse_config
    from raysel.pipeline import run

    corpus = write_jsonl(tmp_path / "corpus.jsonl", bbc_sample(40))
    base = {
        "input": {"path": str(corpus), "id_field": "id", "label_field": "topic"},
        "embed": {"max_tokens": 32},
        "scorers": [{"name": "entropy", "model": tiny_lm(), "max_tokens": 32}],
        "cluster": {"k": 4, "seed": 0},
        "work_dir": str(tmp_path / "work"),
    }
    by_cluster = run(
        parse_config(
            {
                **base,
                "output": {"path": str(tmp_path / "a")},
                "select": {"budget": 12, "policy": "mig", "score": "entropy"},
            }
        )
    )
    info = by_cluster.manifest["selection"]["mig"]
    assert by_cluster.counts["selected"] == 12 and info["n_labels"] == 4 and info["label_sets"] == 4
    ledger = pq.read_table(tmp_path / "a" / "ledger").to_pandas()
    chosen = ledger[ledger.status == "selected"]
    assert chosen.cluster.nunique() == 4  # the concave gain spreads the picks over the clusters
    by_topic = run(
        parse_config(
            {
                **base,
                "output": {"path": str(tmp_path / "b")},
                "select": {"budget": 10, "policy": "mig", "score": "entropy", "params": {"labels": "label"}},
            }
        )
    )
    assert by_topic.manifest["selection"]["mig"]["n_labels"] == 5
    topics = pq.read_table(tmp_path / "b" / "selected").to_pandas().topic
    assert topics.nunique() == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mig_inside_one_cluster_is_the_clusters_best_rows(seed):
    """What the row limit's error claims: with `labels: cluster`, a cluster is one label set, so MIG restricted to a
    cluster takes its rows best quality first: MIG per cluster with a budget per cluster is `stratified`."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=200)
    scores[rng.choice(200, 10, replace=False)] = np.nan  # unscored rows: quality 0, taken last
    quality = scaled_quality(scores, "desc", 0.05)
    a = propagation_matrix(rng.normal(size=(1, 8)), 0.9)
    for budget in (1, 17, 190, 200):
        picks, _, _ = mig_greedy(quality, np.zeros(200, dtype=np.int64), group_directions([(0,)], a), budget)
        assert sorted(picks.tolist()) == sorted(rank(scores, "desc")[:budget].tolist())

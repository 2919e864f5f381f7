"""D2 pruning (raysel/select/d2.py): the heap-based pick order against a plain loop, and what it promises (hard
rows first, then diversity). Its run on Ray against the in-memory policy: tests/select/test_stream.py."""

from __future__ import annotations

import numpy as np
import pytest

from raysel.select.cuts import id_hash
from raysel.select.d2 import D2Params, d2_order, d2_ranks, difficulty, knn


def slow_d2(x, s, tiebreak, k, gf, gr):
    """D2 by hand: distances to every other row, the k nearest (ties by index), one forward round, then pick the
    highest (ties by the hash) and lower its neighbours, until every row is picked."""
    n = len(x)
    nbrs = []
    for i in range(n):
        d = [(float(np.linalg.norm(x[i].astype(np.float64) - x[j])), j) for j in range(n) if j != i]
        nbrs.append(sorted(d)[:k])
    score = [s[i] + sum(np.exp(-gf * d) * s[j] for d, j in nbrs[i]) for i in range(n)]
    left, order = set(range(n)), []
    while left:
        i = min(left, key=lambda r: (-score[r], int(tiebreak[r])))
        left.remove(i)
        order.append(i)
        for d, j in nbrs[i]:
            if j in left:
                score[j] -= np.exp(-gr * d) * score[i]
    return np.array(order)


def unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n,k,gf,gr", [(120, 5, 1.0, 1.0), (60, 10, 0.5, 3.0), (7, 10, 1.0, 1.0), (1, 3, 1.0, 1.0)])
def test_the_pick_order_matches_a_plain_loop(n, k, gf, gr):
    rng = np.random.default_rng(n)
    x, s = unit(rng, n), rng.random(n)
    tiebreak = id_hash(np.arange(n), 0)
    got = d2_order(x, s, tiebreak, D2Params(k=k, gamma_forward=gf, gamma_reverse=gr))
    np.testing.assert_array_equal(got, slow_d2(x, s, tiebreak, k, gf, gr))


def test_knn_is_exact_in_blocks():
    rng = np.random.default_rng(1)
    x = unit(rng, 1100, 16)  # more than one block of 512 rows
    nbr, dist = knn(x, 4)
    full = np.linalg.norm(x[:, None, :].astype(np.float64) - x[None, :, :], axis=2)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(nbr, np.argsort(full, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :4], atol=1e-5)


def test_hard_neighbourhoods_first_one_pick_each():
    """Four tight blobs, each of one difficulty: the first four picks are one per blob, the hardest blob first
    (forward passing ranks the neighbourhoods, reverse passing lowers a pick's neighbours below the next blob)."""
    rng = np.random.default_rng(2)
    centres = unit(rng, 4, 16)
    blob = np.repeat(np.arange(4), 30)
    x = centres[blob] + 0.02 * rng.normal(size=(120, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    params = D2Params(k=29, gamma_forward=1.0, gamma_reverse=0.1)  # a blob is a neighbourhood
    hardness = np.array([0.3, 0.9, 0.1, 0.6])[blob] + 0.01 * rng.random(120)
    first = d2_order(x, hardness, id_hash(np.arange(120), 0), params)[:4]
    assert blob[first].tolist() == [1, 3, 0, 2]
    # a score-ranked selection of 4 would take them all from blob 1
    assert set(blob[np.argsort(-hardness)[:4]]) == {1}


def test_ranks_do_not_depend_on_the_row_order_and_scale_the_score():
    rng = np.random.default_rng(3)
    x, v = unit(rng, 50), rng.normal(size=50)
    ids = np.array([f"r{i}" for i in range(50)], dtype=object)
    a = d2_ranks(x, v, ids, D2Params(), "desc", 0)
    perm = rng.permutation(50)
    b = d2_ranks(x[perm], v[perm], ids[perm], D2Params(), "desc", 0)
    np.testing.assert_array_equal(a[perm], b)
    assert sorted(a) == list(range(50))
    d = difficulty(np.array([2.0, np.nan, 4.0, 3.0]), "asc")
    np.testing.assert_allclose(d, [1.0, 0.0, 0.0, 0.5])

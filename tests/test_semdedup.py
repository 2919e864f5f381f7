"""SemDedup: the blocked greedy against a brute-force pairwise reference, and the step in a real run."""

from __future__ import annotations

import numpy as np
import pytest

from raysel.config import SelectConfig
from raysel.select import Candidates
from raysel.select.semdedup import dedup_cluster, priority


def _brute(emb, threshold):
    """Row by row: compare with every kept row (in order), drop when the largest cosine exceeds the threshold."""
    unit = [v / np.sqrt(float(np.dot(v, v))) for v in np.asarray(emb, dtype=np.float64)]
    kept, dup_of, cos = [], [], []
    for i, v in enumerate(unit):
        best, who = -np.inf, -1
        for j in kept:
            c = float(np.dot(v, unit[j]))
            if c > best:
                best, who = c, j
        if best > threshold:
            dup_of.append(who)
            cos.append(best)
        else:
            kept.append(i)
            dup_of.append(-1)
            cos.append(np.nan)
    return np.array(dup_of), np.array(cos)


def _planted(n_base, copies, dim, seed, noise=0.02):
    """Random directions, some repeated with small noise (cos ~0.99), shuffled: near-duplicates far from the
    threshold, so float32 vs float64 rounding cannot flip a decision."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, dim))
    rows = [base]
    for _ in range(copies):
        pick = base[rng.choice(n_base, size=n_base // 3, replace=False)]
        rows.append(
            pick + noise * np.linalg.norm(pick, axis=1, keepdims=True) / np.sqrt(dim) * rng.normal(size=pick.shape)
        )
    emb = np.concatenate(rows)
    return emb[rng.permutation(len(emb))]


@pytest.mark.parametrize("block", [1, 3, 16, 512])
@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_greedy_equals_brute_force(block, seed):
    emb = _planted(60, 2, 24, seed)
    dup_of, cos = dedup_cluster(emb, 0.9, block=block)
    ref_dup, ref_cos = _brute(emb, 0.9)
    assert dup_of.tolist() == ref_dup.tolist()
    assert np.allclose(cos, ref_cos, equal_nan=True, atol=1e-5)
    assert (dup_of >= 0).sum() > 10  # the planted copies were found
    assert (dup_of < np.arange(len(emb))).all()  # a row only ever points back at an earlier, kept row
    assert (dup_of[dup_of >= 0][:, None] != np.flatnonzero(dup_of >= 0)[None, :]).all()


def test_threshold_is_strict_and_chains_do_not_propagate():
    # b is close to a (cos 0.96), c close to b (0.96) but farther from a (cos ~0.85): with a kept, b goes; c stays
    angle = np.arccos(0.96)
    emb = np.array([[1.0, 0.0], [np.cos(angle), np.sin(angle)], [np.cos(2 * angle), np.sin(2 * angle)]])
    dup_of, cos = dedup_cluster(emb, 0.95)
    assert dup_of.tolist() == [-1, 0, -1]
    assert cos[1] == pytest.approx(0.96)
    assert dedup_cluster(emb, 0.96 + 1e-6)[0].tolist() == [-1, -1, -1]


def test_priority_keeps_the_better_scored_first():
    cands = Candidates(
        ids=np.array(["a", "b", "c", "d"], dtype=object),
        cluster=np.zeros(4, dtype=np.int32),
        scores={"loss": np.array([2.0, np.nan, 5.0, 3.0])},
    )
    desc = SelectConfig(budget=2, policy="random", score="loss", order="desc")
    assert priority(cands, desc).tolist() == [2, 3, 0, 1]  # c, d, a first; the unscored b last
    asc = SelectConfig(budget=2, policy="random", score="loss", order="asc")
    assert priority(cands, asc).tolist() == [0, 3, 2, 1]
    none = SelectConfig(budget=2, policy="random", score="perplexity")  # not computed: by id
    assert priority(cands, none).tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_semdedup_step_in_a_run(ray_cluster, tmp_path):
    import pyarrow.parquet as pq
    from conftest import bbc_sample, tiny_lm, write_jsonl

    from raysel.config import parse_config
    from raysel.pipeline import run

    rows = bbc_sample(24)
    # three exact repeats of other articles' texts under new ids: cosine 1 to their originals
    dups = [{"id": f"dup-{i}", "text": rows[i]["text"], "topic": rows[i]["topic"]} for i in (0, 5, 9)]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows + dups)
    cfg = parse_config(
        {
            "input": {"path": str(corpus), "id_field": "id", "label_field": "topic"},
            "output": {"path": str(tmp_path / "out")},
            "embed": {"max_tokens": 32},
            "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 32}],
            "cluster": {"k": 3, "seed": 0},
            "work_dir": str(tmp_path / "work"),
            "select": {"budget": 0.5, "policy": "topk", "score": "loss", "semdedup": {"threshold": 0.97}},
        }
    )
    result = run(cfg)
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pandas().set_index("id")
    near = ledger[ledger.reason.str.startswith("near-duplicate of")]
    info = result.manifest["selection"]["semdedup"]
    assert (info["threshold"], info["dropped"], info["kept_by"]) == (0.97, len(near), "loss")
    assert sum(info["dropped_per_cluster"].values()) == len(near)
    assert len(near) >= 3 and (near.status == "rejected").all()
    pairs = {i: near.loc[i, "reason"].split()[2] for i in near.index}
    for i in (0, 5, 9):  # each exact pair: one of the two is dropped, pointing at the other, which is kept
        a, b = rows[i]["id"], f"dup-{i}"
        assert (pairs.get(a) == b) != (pairs.get(b) == a)
        dropped, kept = (a, b) if pairs.get(a) == b else (b, a)
        assert ledger.loc[kept, "reason"] == "" or not ledger.loc[kept, "reason"].startswith("near-duplicate")
        assert "(cos 1.00)" in ledger.loc[dropped, "reason"]
    for dropped, kept in pairs.items():  # the kept row is the better-scored (topk by loss, desc)
        assert ledger.loc[kept, "loss"] >= ledger.loc[dropped, "loss"] - 1e-6
    usable = (ledger.status != "quarantined").sum()
    assert result.counts["selected"] == round(0.5 * usable)
    assert result.manifest["selection"]["usable_rows"] == usable - len(near)

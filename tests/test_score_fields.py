"""`input.score_fields`: numeric columns other tools computed, used as scores like raysel's own (issue 15).

A value that is missing or no finite number is unscored (NaN): every policy ranks it last, and the manifest
counts those rows per column (`manifest.scores.unscored`)."""

from __future__ import annotations

import decimal
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import InputConfig, SelectConfig, parse_config
from raysel.errors import ConfigError
from raysel.io.read import CorpusReader, score_value
from raysel.pipeline import run, select_pass
from raysel.report import score_columns, summarize_ledger
from raysel.select import Candidates
from raysel.select.bandit import BanditParams, BanditPolicy
from tests.conftest import bbc_sample, tiny_lm

MINIMAL = {"input": {"path": "c.jsonl"}, "output": {"path": "out"}, "select": {"budget": 0.25}}


def _parse(input_patch: dict | None = None, **patch) -> object:
    return parse_config({**MINIMAL, **patch, "input": {**MINIMAL["input"], **(input_patch or {})}})


# --- config --------------------------------------------------------------------------------------------------


def test_score_fields_are_score_columns_a_policy_can_rank_by():
    cfg = _parse(
        {"score_fields": ["edu_score", "fasttext_hq"]}, select={"budget": 10, "policy": "topk", "score": "edu_score"}
    )
    assert cfg.input.score_fields == ["edu_score", "fasttext_hq"]
    assert cfg.score_columns == ["entropy", "loss", "edu_score", "fasttext_hq"]
    assert _parse().input.score_fields == [] and _parse().score_columns == ["entropy", "loss"]
    # with no scorer at all: a score field alone is enough for a policy that ranks
    only = _parse({"score_fields": ["edu_score"]}, scorers=[], select={"budget": 0.5, "score": "edu_score"})
    assert only.score_columns == ["edu_score"]
    # the bandit's cheap score (select.score) may be one too
    bandit = _parse({"score_fields": ["edu_score"]}, select={"budget": 0.5, "policy": "bandit", "score": "edu_score"})
    assert bandit.select.score == "edu_score"


@pytest.mark.parametrize(
    ("input_patch", "patch", "message"),
    [
        ({"score_fields": ["a", "a"]}, {}, "input: score_fields[1]: 'a' is listed twice"),
        ({"score_fields": [" "]}, {}, "input: score_fields[0]: a score field needs a name"),
        ({"score_fields": ["text"]}, {}, "'text' is also the text_field"),
        ({"score_fields": ["doc"], "id_field": "doc"}, {}, "'doc' is also the id_field"),
        ({"score_fields": ["y"], "label_field": "y"}, {}, "'y' is also the label_field"),
        ({"score_fields": ["cluster"]}, {}, "'cluster' is the name of a column raysel writes"),
        ({"score_fields": ["source"]}, {}, "'source' is the name of a column raysel writes"),
        ({"score_fields": ["__row"]}, {}, "start with `__`"),
        ({"score_fields": ["loss"]}, {}, "input.score_fields[0]: 'loss' is also a scorer in `scorers`"),
        ({"score_fields": "edu_score"}, {}, "input.score_fields: Input should be a valid list"),
        (
            {"score_fields": ["edu_score"]},
            {"select": {"budget": 0.5, "score": "edu"}},
            "select.score: 'edu' is not computed; add it to `scorers` or `input.score_fields`, or choose from "
            "['entropy', 'loss', 'edu_score']",
        ),
    ],
)
def test_bad_score_fields_name_the_field(input_patch, patch, message):
    with pytest.raises(ConfigError) as err:
        _parse(input_patch, **patch)
    assert message in str(err.value)


def test_a_field_named_like_a_scorer_that_does_not_run_is_fine():
    cfg = _parse({"score_fields": ["loss"]}, scorers=["entropy"], select={"budget": 0.5, "score": "loss"})
    assert cfg.score_columns == ["entropy", "loss"]


# --- reading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.7, 0.7),
        (3, 3.0),
        (-2, -2.0),
        (decimal.Decimal("0.25"), 0.25),
        (None, math.nan),
        ("0.7", math.nan),  # a numeric string: text another tool wrote, not a number
        (True, math.nan),  # a flag is no score
        (False, math.nan),
        ([0.5], math.nan),
        ({"v": 1}, math.nan),
        (math.inf, math.nan),
        (math.nan, math.nan),
        (10**400, math.nan),  # no float holds it
        (decimal.Decimal("NaN"), math.nan),
    ],
)
def test_score_value(value, expected):
    got = score_value(value)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def _read(cfg: InputConfig, path: Path) -> dict[str, list]:
    batches = list(CorpusReader(cfg)({"uri": np.array([str(path)], dtype=object), "rel": np.array([path.name])}))
    return {k: np.concatenate([b[k] for b in batches]).tolist() for k in batches[0]}


def _same(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(
        (math.isnan(g) and math.isnan(e)) or g == e for g, e in zip(got, expected, strict=True)
    )


def test_jsonl_score_fields_become_float64_columns(tmp_path):
    lines = [
        '{"text": "a", "edu": 0.5, "hq": 2}',
        '{"text": "b", "hq": -1.5}',  # edu missing
        '{"text": "c", "edu": "0.7", "hq": null}',
        '{"text": "d", "edu": true, "hq": NaN}',  # Python's json reads NaN; it is unscored
        '{"text": "e", "edu": [1], "hq": Infinity}',
        '{"text": "  ", "edu": 0.9}',  # quarantined (empty text): keeps the value the line had
        '{"text": "unterminated',  # malformed: no record, no value
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = _read(InputConfig(path=str(path), score_fields=["edu", "hq"]), path)
    nan = math.nan
    assert _same(out["edu"], [0.5, nan, nan, nan, nan, 0.9, nan])
    assert _same(out["hq"], [2.0, -1.5, nan, nan, nan, nan, nan])
    assert out["reason"][:5] == [""] * 5 and out["reason"][5] == "empty text" and out["reason"][6]
    batch = next(
        iter(CorpusReader(InputConfig(path=str(path), score_fields=["edu"]))({"uri": [str(path)], "rel": ["c"]}))
    )
    assert batch["edu"].dtype == np.float64


def test_parquet_score_fields_of_every_column_type(tmp_path):
    path = tmp_path / "c.parquet"
    table = pa.table(
        {
            "text": ["a", "b", "c"],
            "f": pa.array([0.25, None, 1.0], pa.float32()),
            "i": pa.array([1, 2, None], pa.int64()),
            "d": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-2.00")], pa.decimal128(5, 2)),
            "s": ["0.1", "0.2", "0.3"],  # a string column: not numbers
            "b": [True, False, True],
        }
    )
    pq.write_table(table, path)
    out = _read(InputConfig(path=str(path), score_fields=["f", "i", "d", "s", "b", "absent"]), path)
    nan = math.nan
    assert _same(out["f"], [0.25, nan, 1.0])
    assert _same(out["i"], [1.0, 2.0, nan])
    assert _same(out["d"], [1.5, nan, -2.0])
    assert _same(out["s"], [nan] * 3) and _same(out["b"], [nan] * 3) and _same(out["absent"], [nan] * 3)


def test_an_unreadable_file_row_has_no_score(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    out = _read(InputConfig(path=str(path), score_fields=["edu"]), path)
    assert out["row"] == [-1] and _same(out["edu"], [math.nan])


# --- selection, without Ray ------------------------------------------------------------------------------------


def test_select_pass_hands_score_fields_to_the_policy():
    cfg = _parse({"score_fields": ["edu"]}, scorers=["loss"], select={"budget": 2, "policy": "topk", "score": "edu"})
    table = pa.table(
        {
            "id": ["a", "b", "c", "d", "e"],
            "reason": ["", "", "", "", "bad"],
            "cluster": [0, 0, 1, 1, -1],
            "loss": pa.array([1.0, 2.0, 3.0, 4.0, math.nan], pa.float32()),
            "edu": [0.1, math.nan, 0.9, 0.5, 5.0],
        }
    )
    out, info = select_pass(cfg, table)
    assert out.column("status").to_pylist() == ["rejected", "rejected", "selected", "selected", "quarantined"]
    assert out.column("reason").to_pylist()[1] == "unscored by edu, ranked last"
    assert info["cut"] == 0.5


def test_bandit_ranks_unscored_rows_last_by_its_cheap_score():
    candidates = Candidates(
        ids=np.array(list("abcdef")),
        cluster=np.array([0, 0, 0, 1, 1, 1]),
        scores={"edu": np.array([np.nan, 0.2, 0.9, 0.1, np.nan, 0.3])},
    )

    def kept(order: str, quota: int) -> str:
        config = SelectConfig(budget=4, policy="bandit", score="edu", order=order, params={"within": "cheap"})
        arms, quotas, none = np.array([0, 1]), np.array([quota, quota]), np.zeros(0, int)
        selected, _, ranked_by = BanditPolicy(config)._take(
            candidates, candidates.cluster, arms, quotas, none, np.zeros(0), math.nan, BanditParams(within="cheap")
        )
        assert ranked_by == "edu"
        return "".join(candidates.ids[selected])

    assert kept("desc", 1) == "cf" and kept("asc", 1) == "bd"
    assert kept("desc", 2) == kept("asc", 2) == "bcdf"  # the NaN rows last in either order


# --- a real run: JSONL + Parquet ------------------------------------------------------------------------------


def _edu(i: int):
    """The corpus's edu_score: a number for most rows, missing for some, a string or a bool for others."""
    if i % 7 == 3:
        return "missing"
    if i % 7 == 5:
        return "0.7"
    if i == 8:
        return True
    return round(((i * 37) % 29) / 29 + i / 1000, 4)  # distinct


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_fields")
    (root / "corpus").mkdir()
    articles = bbc_sample(30, seed=21, max_chars=160)
    records = []
    for i, a in enumerate(articles):
        record = {"id": f"d{i:02d}", "text": a["text"]}
        if _edu(i) != "missing":
            record["edu_score"] = _edu(i)
        records.append(record)
    jsonl, parquet = records[:20], records[20:]
    with open(root / "corpus" / "a.jsonl", "w") as f:
        for r in jsonl:
            f.write(json.dumps(r) + "\n")
        f.write('{"id": "bad", "text": "unterminated\n')  # quarantined: not counted as unscored
    # Parquet holds one type per column: the numbers, with nulls for the rest
    pq.write_table(
        pa.table(
            {
                "id": [r["id"] for r in parquet],
                "text": [r["text"] for r in parquet],
                "edu_score": pa.array(
                    [v if isinstance(v := r.get("edu_score"), float) else None for r in parquet], pa.float64()
                ),
            }
        ),
        root / "corpus" / "b.parquet",
    )
    expected = {}
    for r in jsonl:
        v = r.get("edu_score")
        expected[r["id"]] = v if isinstance(v, float) else math.nan
    for r in parquet:
        v = r.get("edu_score")
        expected[r["id"]] = v if isinstance(v, float) else math.nan
    return root, jsonl, expected


def _config(root: Path, name: str, select: dict, **output) -> dict:
    return {
        "input": {"path": str(root / "corpus"), "id_field": "id", "score_fields": ["edu_score"]},
        "output": {"path": str(root / name), **output},
        "embed": {"batch_size": 8, "max_tokens": 16},
        "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 12, "batch_size": 8}],
        "cluster": {"k": 2},
        "select": select,
        "work_dir": str(root / "work"),
    }


def _ranked(expected: dict[str, float], order: str) -> list[str]:
    """Ids best-first by edu_score, NaN last, ties (the NaNs) in id order."""
    scored = sorted((i for i, v in expected.items() if not math.isnan(v)), key=lambda i: expected[i])
    if order == "desc":
        scored = scored[::-1]
    return scored + sorted(i for i, v in expected.items() if math.isnan(v))


def test_topk_by_a_score_field_end_to_end(corpus, ray_cluster):
    root, jsonl, expected = corpus
    unscored = sum(math.isnan(v) for v in expected.values())
    assert 0 < unscored < 15 and len(expected) == 30
    result = run(
        parse_config(_config(root, "top", {"budget": 10, "policy": "topk", "score": "edu_score"}, format="jsonl"))
    )
    out = root / "top"

    ledger = pq.read_table(out / "ledger")
    assert ledger.schema.field("edu_score").type == pa.float64()
    rows = {r["id"]: r for r in ledger.to_pylist() if r["status"] != "quarantined"}
    assert len(rows) == 30 and result.counts == {"selected": 10, "rejected": 20, "quarantined": 1}
    assert _same([rows[i]["edu_score"] for i in sorted(rows)], [expected[i] for i in sorted(rows)])
    chosen = sorted(i for i, r in rows.items() if r["status"] == "selected")
    assert chosen == sorted(_ranked(expected, "desc")[:10])

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scores"] == {
        "scorers": ["loss"],
        "fields": ["edu_score"],
        "unscored": {"loss": 0, "edu_score": unscored},
    }
    assert manifest["selection"]["cut"] == pytest.approx(expected[_ranked(expected, "desc")[9]])

    # selected JSONL: each record as it came in (edu_score untouched), plus raysel's columns
    got = [json.loads(line) for p in sorted((out / "selected").glob("*.jsonl")) for line in p.read_text().splitlines()]
    assert sorted(r["id"] for r in got) == chosen
    originals = {r["id"]: r for r in jsonl}
    for r in got:
        assert set(r) - {"id", "text", "edu_score"} == {"cluster", "loss"}
        if r["id"] in originals:
            assert {k: v for k, v in r.items() if k not in ("cluster", "loss")} == originals[r["id"]]
        else:
            assert r["edu_score"] == expected[r["id"]]

    # the report draws it with raysel's scores
    assert score_columns(manifest) == ["loss", "edu_score"]
    assert set(summarize_ledger(str(out / "ledger"), score_columns(manifest)).hist) == {"loss", "edu_score"}


def test_unscored_rows_come_last_in_either_order(corpus, ray_cluster):
    root, _, expected = corpus
    scored = sum(not math.isnan(v) for v in expected.values())
    select = {"budget": scored + 2, "policy": "topk", "score": "edu_score", "order": "asc"}
    result = run(parse_config(_config(root, "asc", select, prefix="raysel_")))
    assert result.manifest["reuse"]["scores"]["reused"] is True  # only `select` changed
    out = root / "asc"
    table = pq.read_table(out / "selected")
    ids = table.column("raysel_id").to_pylist()
    ranked = _ranked(expected, "asc")
    # every scored row, then 2 unscored ones: which two, a seeded hash of the id decides (their scores tie)
    assert len(ids) == scored + 2 and set(ranked[:scored]) <= set(ids)
    assert all(math.isnan(expected[i]) for i in set(ids) - set(ranked[:scored]))
    assert "raysel_loss" in table.column_names and "raysel_edu_score" not in table.column_names
    ledger = {r["id"]: r for r in pq.read_table(out / "ledger").to_pylist()}
    rejected_nan = [i for i, v in expected.items() if math.isnan(v) and ledger[i]["status"] == "rejected"]
    assert rejected_nan and all(ledger[i]["reason"] == "unscored by edu_score, ranked last" for i in rejected_nan)
    assert result.manifest["selection"]["cut"] is None  # the budget reached the unscored rows


def test_stratified_and_hard_easy_rank_by_a_score_field(corpus, ray_cluster):
    root, _, expected = corpus
    scored = sorted((i for i, v in expected.items() if not math.isnan(v)), key=lambda i: expected[i])
    assert len(scored) == 21

    run(parse_config(_config(root, "he", {"budget": 15, "policy": "hard_easy", "score": "edu_score"})))
    ledger = {r["id"]: r for r in pq.read_table(root / "he" / "ledger").to_pylist()}
    # round(0.1 * 15) = 2 hardest (highest), 13 easiest; no unscored row while scored ones are left
    assert sorted(i for i in expected if ledger[i]["status"] == "selected") == sorted(scored[-2:] + scored[:13])

    run(parse_config(_config(root, "strat", {"budget": 0.5, "policy": "stratified", "score": "edu_score"})))
    ledger = {r["id"]: r for r in pq.read_table(root / "strat" / "ledger").to_pylist()}
    for c in {ledger[i]["cluster"] for i in expected}:  # inside a cluster, the best edu_scores, NaN last
        members = [i for i in expected if ledger[i]["cluster"] == c]
        kept = [i for i in members if ledger[i]["status"] == "selected"]
        assert sorted(kept) == sorted(_ranked({i: expected[i] for i in members}, "desc")[: len(kept)])


def test_a_score_field_no_file_has_is_warned_about(tmp_path, caplog):
    from raysel.io.read import check_input, list_input

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "edu_score": 0.5}\n')
    cfg = InputConfig(path=str(path), score_fields=["edu_score", "edu_scor"])
    with caplog.at_level("WARNING", logger="raysel.io.read"):
        check_input(list_input(cfg), cfg)
    assert "input.score_fields ['edu_scor']: no such column in the first 1 input file(s)" in caplog.text
    caplog.clear()
    ok = InputConfig(path=str(path), score_fields=["edu_score"])
    with caplog.at_level("WARNING", logger="raysel.io.read"):
        check_input(list_input(ok), ok)
    assert "score_fields" not in caplog.text

"""Every kind of bad input gets its documented outcome, and the ledger still accounts for every row."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysel.config import InputConfig, parse_config
from raysel.errors import InputError
from raysel.io.read import CorpusReader
from raysel.pipeline import _quarantine_duplicate_ids, run, select_pass
from tests.conftest import bbc_sample, tiny_lm

LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def _bad_corpus(root):
    good = bbc_sample(20, seed=9)
    lines = [json.dumps(r).encode() for r in good[:10]]
    lines += [
        b'{"id": "m1", "text": "malformed',
        json.dumps({"id": "e1", "text": "", "topic": "tech"}).encode(),
        json.dumps({"id": "w1", "text": " \t\n ", "topic": "tech"}).encode(),
        json.dumps({"id": "n1", "text": ["a", "list"], "topic": "tech"}).encode(),
        b'{"id": "u1", "text": "\xff\xfe broken bytes", "topic": "tech"}',
        json.dumps({"id": "big", "text": "All work and no play. " * 240_000, "topic": "tech"}).encode(),  # 5.3 MB
        json.dumps({**good[0], "text": "the same id again"}).encode(),  # a duplicate id
        json.dumps({"id": "l1", "text": "A text with a label outside the set.", "topic": "weather"}).encode(),
    ]
    (root / "corpus").mkdir()
    (root / "corpus" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.Table.from_pylist(good[10:]), root / "corpus" / "b.parquet")
    pq.write_table(
        pa.table({"id": ["x1", "x2"], "body": ["no text column", "here either"], "topic": ["tech"] * 2}),
        root / "corpus" / "c.parquet",
    )
    full = root / "corpus" / "b.parquet"
    (root / "corpus" / "d.parquet").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])  # truncated
    return root / "corpus"


def test_bad_rows_are_quarantined_with_reasons(tmp_path, ray_cluster):
    corpus = _bad_corpus(tmp_path)
    cfg = parse_config(
        {
            "input": {"path": str(corpus), "id_field": "id", "label_field": "topic", "labels": LABELS},
            "output": {"path": str(tmp_path / "out")},
            "embed": {"batch_size": 16, "max_tokens": 16},
            "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 12}],
            "cluster": {"k": 2},
            "select": {"budget": 0.5, "policy": "topk", "score": "loss"},
            "work_dir": str(tmp_path / "work"),
        }
    )
    result = run(cfg)
    ledger = pq.read_table(tmp_path / "out" / "ledger").to_pylist()
    # 10 good + 8 odd JSONL rows, 10 Parquet rows, 2 rows without text, 1 record for the truncated file
    assert len(ledger) == 31
    by_id = {r["id"]: r for r in ledger if r["source"] == "a.jsonl"}
    reasons = {r["reason"] for r in ledger if r["status"] == "quarantined"}
    assert any(r.startswith("malformed JSON") for r in reasons)
    assert by_id["e1"]["reason"] == by_id["w1"]["reason"] == "empty text"
    assert by_id["n1"]["reason"] == "text is not a string (list)"
    assert by_id["l1"]["reason"] == "label 'weather' is not in input.labels"
    assert any(r.startswith("undecodable bytes") for r in reasons)
    assert any(r.startswith("duplicate id (first at") for r in reasons)
    assert by_id["big"]["status"] != "quarantined" and by_id["big"]["text_cut"] and by_id["big"]["lm_cut"]
    assert [r["reason"] for r in ledger if r["source"] == "c.parquet"] == ["missing text field 'text'"] * 2
    truncated = [r for r in ledger if r["source"] == "d.parquet"]
    assert len(truncated) == 1 and truncated[0]["reason"].startswith("unreadable parquet file")
    counts = Counter(r["status"] for r in ledger)
    assert counts["quarantined"] == 10 and counts["selected"] == 11 and counts["rejected"] == 10
    assert result.manifest["truncated"]["text_cut"] == 1
    assert pq.read_table(tmp_path / "out" / "selected").num_rows == 11


def test_an_unusable_input_fails_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"body": "x"}\n')
    cfg = parse_config(  # the output beside the input folder: inside it, the config itself is refused
        {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, "select": {"budget": 1}}
    )
    with pytest.raises(InputError, match="no input file has the text field 'text'"):
        run(cfg)
    assert not (tmp_path / "out").exists()


# --- the ledger invariant, over random corpora ----------------------------------------------------------------

GOOD = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)
LINE = st.one_of(
    GOOD.map(lambda t: json.dumps({"text": t}).encode()),
    st.sampled_from(["dup-1", "dup-2"]).map(lambda i: json.dumps({"id": i, "text": "x"}).encode()),
    st.just(b'{"text": '),
    st.just(json.dumps({"text": ""}).encode()),
    st.just(json.dumps({"text": 3.5}).encode()),
    st.just(b'{"text": "\xc3\x28"}'),
    st.just(json.dumps({"other": "y"}).encode()),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(LINE, max_size=60),
    budget=st.integers(1, 80),
    policy=st.sampled_from(["random", "topk", "stratified"]),
)
def test_ledger_accounts_for_every_row_read(tmp_path, lines, budget, policy):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg_input = InputConfig(path=str(path), id_field="id")
    batches = list(
        CorpusReader(cfg_input, rows_per_batch=7)(
            {"uri": np.array([str(path)], dtype=object), "rel": np.array(["c.jsonl"], dtype=object)}
        )
    )
    rows_read = sum(1 for b in lines if b.strip())
    if not batches:
        assert rows_read == 0
        return
    table = pa.concat_tables(pa.table({k: v for k, v in b.items()}) for b in batches)
    assert table.num_rows == rows_read
    rng = np.random.default_rng(0)
    table = table.append_column("loss", pa.array(rng.normal(size=table.num_rows)))
    usable = pa.compute.equal(table.column("reason"), "").to_numpy(zero_copy_only=False)
    table = table.append_column(
        "cluster", pa.array(np.where(usable, rng.integers(0, 3, table.num_rows), -1), type=pa.int32())
    )
    table = _quarantine_duplicate_ids(
        table.sort_by([("id", "ascending"), ("source", "ascending"), ("row", "ascending")])
    )
    cfg = parse_config(
        {
            "input": {"path": str(path)},
            "output": {"path": "unused"},
            "scorers": ["loss"],
            "select": {"budget": budget, "policy": policy, "score": "loss"},
        }
    )
    ledger, info = select_pass(cfg, table)
    status = Counter(ledger.column("status").to_pylist())
    assert sum(status.values()) == rows_read
    assert status["selected"] == min(budget, info["usable_rows"])
    assert all(
        r
        for r, s in zip(ledger.column("reason").to_pylist(), ledger.column("status").to_pylist(), strict=True)
        if s != "selected"
    )
    assert (
        len(set(ledger.filter(pa.compute.equal(ledger.column("status"), "selected")).column("id").to_pylist()))
        == status["selected"]
    )

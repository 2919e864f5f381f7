import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysel.config import InputConfig
from raysel.errors import InputError
from raysel.io.read import CorpusReader, check_input, list_input, stable_id


def _read(cfg, rel, uri, **kw):
    batches = list(
        CorpusReader(cfg, **kw)({"uri": np.array([uri], dtype=object), "rel": np.array([rel], dtype=object)})
    )
    if batches and isinstance(batches[0], pa.Table):
        return pa.concat_tables(batches).to_pylist()
    return {k: np.concatenate([b[k] for b in batches]).tolist() for k in batches[0]}


def test_jsonl_rows_get_reasons_and_nothing_is_lost(tmp_path):
    lines = [
        json.dumps({"id": 1, "text": "good one", "y": "a"}).encode(),
        b'{"id": 2, "text": "unterminated',
        json.dumps({"id": 3, "text": "   "}).encode(),
        json.dumps({"id": 4, "text": 12}).encode(),
        b'{"id": 5, "text": "caf\xe9"}',
        json.dumps({"id": 6, "body": "x"}).encode(),
        b"[1, 2]",
        b"",  # a blank line is no record
        json.dumps({"id": None, "text": "no id"}).encode(),
        json.dumps({"id": 8, "text": "x" * 50}).encode(),
    ]
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = _read(InputConfig(path=str(path), id_field="id", max_chars=20), "c.jsonl", str(path))
    assert out["row"] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    reasons = out["reason"]
    assert reasons[0] == "" and out["text"][0] == "good one" and out["id"][0] == "1"
    assert reasons[1].startswith("malformed JSON")
    assert reasons[2] == "empty text"
    assert reasons[3] == "text is not a string (int)"
    assert reasons[4].startswith("undecodable bytes")
    assert reasons[5] == "missing text field 'text'"
    assert reasons[6] == "not a JSON object (list)"
    assert reasons[7] == "missing or invalid id field 'id'"
    assert reasons[8] == "" and out["text_cut"][8] and len(out["text"][8]) == 20
    assert all(t == "" for t, r in zip(out["text"], reasons, strict=True) if r)


def test_ids_hash_file_and_row_without_an_id_field(tmp_path):
    path = tmp_path / "sub" / "c.jsonl"
    path.parent.mkdir()
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    out = _read(InputConfig(path=str(tmp_path)), "sub/c.jsonl", str(path))
    assert out["id"] == [stable_id("sub/c.jsonl", 0), stable_id("sub/c.jsonl", 1)]
    assert len(set(out["id"])) == 2


def test_labels_are_read_and_missing_labels_quarantined(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "y": "pos"}\n{"text": "b", "y": 3}\n{"text": "c"}\n')
    out = _read(InputConfig(path=str(path), label_field="y"), "c.jsonl", str(path))
    assert out["label"] == ["pos", "3", ""]
    assert out["reason"] == ["", "", "missing label field 'y'"]


def test_parquet_rows_and_truncated_file(tmp_path):
    table = pa.table({"text": ["x", None, "z"], "n": [1, 2, 3]})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    out = _read(InputConfig(path=str(path)), "c.parquet", str(path))
    assert out["reason"] == ["", "text is not a string (NoneType)", ""]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:-20])
    out = _read(InputConfig(path=str(broken)), "broken.parquet", str(broken))
    assert out["row"] == [-1] and out["reason"][0].startswith("unreadable parquet file")


def test_keep_rows_returns_the_original_records(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "n": i, "nested": {"a": i}}) + "\n" for i in range(10)))
    records = _read(InputConfig(path=str(path)), "c.jsonl", str(path), keep_rows={"c.jsonl": [2, 7]})
    assert [(r["n"], r["__row"], r["nested"]) for r in records] == [(2, 2, {"a": 2}), (7, 7, {"a": 7})]
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(10)], "n": list(range(10))}), tmp_path / "c.parquet")
    records = _read(
        InputConfig(path=str(tmp_path)),
        "c.parquet",
        str(tmp_path / "c.parquet"),
        keep_rows={"c.parquet": [0, 9]},
        rows_per_batch=4,
    )
    assert [(r["n"], r["__row"], r["__source"]) for r in records] == [(0, 0, "c.parquet"), (9, 9, "c.parquet")]


def test_listing_and_whole_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_input(InputConfig(path=str(tmp_path / "nope")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="holds no"):
        list_input(InputConfig(path=str(tmp_path)))
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "_hidden.jsonl").write_text('{"text": "x"}\n')
    files = list_input(InputConfig(path=str(tmp_path)))
    assert [f.rel for f in files] == ["a.jsonl"]
    with pytest.raises(InputError, match="no input file has the text field 'text'"):
        check_input(files, InputConfig(path=str(tmp_path)))
    check_input(files, InputConfig(path=str(tmp_path), text_field="body"))
    assert [f.rel for f in list_input(InputConfig(path=str(tmp_path / "*.jsonl")))] == ["a.jsonl"]


def test_lone_surrogate_escapes_are_quarantined_not_passed_on(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'{"id": "1", "text": "ok \\ud83d\\ude00 pair"}\n'  # an escaped surrogate *pair* is one valid character
        b'{"id": "2", "text": "bad\\ud800 text"}\n'
        b'{"id": "3\\uDC00", "text": "bad id"}\n'
        b'{"id": "4", "text": "fine", "title": "x\\udfff"}\n'
        b'{"id": "5", "text": "a literal \\\\ud800 is text"}\n'
    )
    out = _read(InputConfig(path=str(path), id_field="id"), "c.jsonl", str(path))
    assert out["reason"] == [
        "",
        "text is not valid unicode (lone surrogate at character 3)",
        "field 'id' is not valid unicode (lone surrogate at character 1)",
        "field 'title' is not valid unicode (lone surrogate at character 1)",
        "",
    ]
    assert out["text"][0] == "ok \U0001f600 pair" and out["text"][4] == "a literal \\ud800 is text"
    assert out["id"][2] == stable_id("c.jsonl", 2)  # the bad id is not passed on either
    pa.table({k: pa.array(v) for k, v in out.items()})  # every value converts to Arrow (the next stage's need)


def test_a_utf8_bom_before_the_first_record_is_not_part_of_it(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"body": "first"}\n{"body": "second"}\n')
    out = _read(InputConfig(path=str(path), text_field="body"), "c.jsonl", str(path))
    assert out["reason"] == ["", ""] and out["text"] == ["first", "second"]
    records = _read(InputConfig(path=str(path)), "c.jsonl", str(path), keep_rows={"c.jsonl": [0]})
    assert [(r["body"], r["__row"]) for r in records] == [("first", 0)]
    path.write_bytes(b'\xef\xbb\xbf{"body": "only"}\n')
    files = list_input(InputConfig(path=str(path)))
    check_input(files, InputConfig(path=str(path), text_field="body"))
    with pytest.raises(InputError, match="no input file has the text field 'text'"):
        check_input(files, InputConfig(path=str(path)))

"""The selected subset as training data (raysel/io/selected.py): records kept as they came, nested and
mixed-type fields included, in even shards of every output format, with an index a loader can verify."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raysel.config import parse_config
from raysel.io.selected import Part, attach_columns, conform, plan_shards, records_table, shared_schema
from raysel.pipeline import run
from tests.conftest import bbc_sample, tiny_lm

# --- records and schemas, no Ray ------------------------------------------------------------------------------


def test_records_with_mixed_types_become_a_table_without_losing_anything():
    records = [
        {"id": 1, "meta": {"url": "a"}, "tags": ["x"], "n": 1},
        {"id": "b2", "meta": "plain", "tags": [{"k": 1}], "n": 2.5},
    ]
    table = records_table(records)
    assert table.column("id").to_pylist() == ["1", "b2"]  # int and string: the ids as strings
    assert table.column("n").to_pylist() == [1, 2.5]
    assert [json.loads(v) if v.startswith(("{", "[")) else v for v in table.column("meta").to_pylist()] == [
        {"url": "a"},
        "plain",
    ]
    assert [json.loads(v) for v in table.column("tags").to_pylist()] == [["x"], [{"k": 1}]]


def test_one_schema_for_parts_that_disagree():
    a = pa.table({"meta": [{"url": "a"}], "n": [1], "only_a": [True]})
    b = pa.table({"meta": ["plain"], "n": [2.5]})
    schema = shared_schema([a.schema, b.schema])
    assert schema.field("meta").type == pa.string() and schema.field("n").type == pa.float64()
    assert conform(a, schema).to_pylist() == [{"meta": '{"url": "a"}', "n": 1.0, "only_a": True}]
    assert conform(b, schema).to_pylist() == [{"meta": "plain", "n": 2.5, "only_a": None}]


def test_attach_keeps_nested_columns_that_arrow_cannot_join():
    records = pa.table(
        {
            "meta": [{"u": "a"}, {"u": "b"}, {"u": "c"}],
            "tags": [["x"], [], ["y", "z"]],
            "__source": ["f", "f", "f"],
            "__row": [0, 5, 9],
        }
    )
    attach = pa.table({"__source": ["f", "f"], "__row": [9, 0], "id": ["i9", "i0"], "loss": [0.9, 0.1]})
    joined = attach_columns(records, attach)
    assert joined.select(["meta", "tags", "id", "loss"]).to_pylist() == [
        {"meta": {"u": "a"}, "tags": ["x"], "id": "i0", "loss": 0.1},
        {"meta": {"u": "c"}, "tags": ["y", "z"], "id": "i9", "loss": 0.9},
    ]


def test_shards_are_cut_evenly_across_parts_in_order():
    parts = [Part("a", 5), Part("b", 1), Part("c", 8)]
    plan = plan_shards(parts, 4)
    assert [sum(n for _, _, n in shard) for shard in plan] == [4, 4, 4, 2]
    assert plan[1] == [("a", 4, 1), ("b", 0, 1), ("c", 0, 2)]


# --- real runs ---------------------------------------------------------------------------------------------


def _corpus_lines() -> list[dict]:
    rows = bbc_sample(30, seed=12, max_chars=200)
    out = []
    for i, r in enumerate(rows):
        record = {"id": i if i % 3 else f"doc-{i}", "text": r["text"], "meta": {"topic": r["topic"], "n": i}}
        record["tags"] = [r["topic"], "bbc"] if i % 2 else []
        record["extra"] = {"nested": [1, 2]} if i % 5 == 0 else "flat"  # no common type: kept as JSON text
        out.append(record)
    return out


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """A folder of a .jsonl.zst file with nested and mixed-type fields and a Parquet file with list and
    struct columns."""
    root = tmp_path_factory.mktemp("selected")
    lines = _corpus_lines()
    corpus = root / "corpus"
    corpus.mkdir()
    body = "".join(json.dumps(r) + "\n" for r in lines[:20]).encode()
    with pa.CompressedOutputStream(str(corpus / "a.jsonl.zst"), "zstd") as f:
        f.write(body)
    parquet_rows = [{**r, "id": f"p-{r['id']}", "extra": None} for r in lines[20:]]
    pq.write_table(pa.Table.from_pylist(parquet_rows), corpus / "b.parquet")
    return root, lines[:20], parquet_rows


def _config(root: Path, name: str, **output) -> dict:
    return {
        "input": {"path": str(root / "corpus"), "id_field": "id"},
        "output": {"path": str(root / name), **output},
        "embed": {"batch_size": 8, "max_tokens": 16},
        "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 12, "batch_size": 8}],
        "cluster": {"k": 2},
        "select": {"budget": 0.5, "policy": "stratified", "score": "loss"},
        "work_dir": str(root / "work"),
    }


def _index(out: Path) -> dict:
    index = json.loads((out / "selected" / "_index.json").read_text())
    for shard in index["shards"]:  # what a loader checks
        body = (out / "selected" / shard["name"]).read_bytes()
        assert len(body) == shard["bytes"] and hashlib.sha256(body).hexdigest() == shard["sha256"]
    return index


def test_jsonl_zst_round_trip_gives_back_the_input_records(mixed_corpus, ray_cluster):
    root, jsonl_rows, parquet_rows = mixed_corpus
    result = run(parse_config(_config(root, "zst", format="jsonl.zst", annotate=False, shard_rows=4)))
    out = root / "zst"
    index = _index(out)
    assert index["format"] == "jsonl.zst" and index["rows"] == result.counts["selected"] == 15
    assert [s["name"] for s in index["shards"]] == [f"part-{i:05d}.jsonl.zst" for i in range(4)]
    assert [s["rows"] for s in index["shards"]] == [4, 4, 4, 3]
    got = []
    for shard in index["shards"]:
        with pa.input_stream(str(out / "selected" / shard["name"]), compression="zstd") as f:
            got += [json.loads(line) for line in f.read().decode().splitlines()]
    from_jsonl = [r for r in got if not str(r["id"]).startswith("p-")]
    assert from_jsonl and all(r in jsonl_rows for r in from_jsonl)  # each line exactly as it came in
    assert all(r in [{**p, "extra": None} for p in parquet_rows] for r in got if str(r["id"]).startswith("p-"))
    ledger = pq.read_table(out / "ledger")
    selected_ids = sorted(ledger.filter(pa.compute.equal(ledger["status"], "selected")).column("id").to_pylist())
    assert sorted(str(r["id"]) for r in got) == selected_ids


def test_parquet_output_keeps_nested_fields_and_types_with_raysel_columns_under_a_prefix(mixed_corpus, ray_cluster):
    root, jsonl_rows, _ = mixed_corpus
    run(parse_config(_config(root, "pq", shard_rows=6, prefix="raysel_")))
    out = root / "pq"
    index = _index(out)
    assert [s["rows"] for s in index["shards"]] == [6, 6, 3]
    table = pq.read_table(out / "selected")
    assert {"raysel_id", "raysel_cluster", "raysel_loss", "meta", "tags", "extra"} <= set(table.column_names)
    assert pa.types.is_struct(table.schema.field("meta").type) and pa.types.is_list(table.schema.field("tags").type)
    by_id = {r["raysel_id"]: r for r in table.to_pylist()}
    for record in jsonl_rows:
        if str(record["id"]) in by_id:
            row = by_id[str(record["id"])]
            assert row["meta"] == record["meta"] and row["tags"] == record["tags"]
            assert row["extra"] == (json.dumps(record["extra"]) if isinstance(record["extra"], dict) else "flat")
    # the same settings again give the same shards, byte for byte
    run(parse_config(_config(root, "pq", shard_rows=6, prefix="raysel_")), overwrite=True)
    assert _index(out) == index


def _lines(body: bytes, fmt: str) -> list[dict]:
    if fmt == "jsonl.gz":
        body = gzip.decompress(body)
    elif fmt == "jsonl.zst":
        body = pa.input_stream(pa.py_buffer(body), compression="zstd").read()
    return [json.loads(line) for line in body.decode().splitlines()]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_jsonl_outputs_on_s3(mixed_corpus, s3_server, ray_cluster, fmt):
    root, _, _ = mixed_corpus
    config = _config(root, "unused", format=fmt, shard_bytes=2000)
    prefix = f"raysel-test/selected-out/{fmt}"
    config["output"]["path"] = f"s3://{prefix}"
    run(parse_config(config))
    fs = s3_server.filesystem()
    with fs.open_input_stream(f"{prefix}/selected/_index.json") as f:
        index = json.loads(f.read())
    assert len(index["shards"]) > 1 and index["rows"] == 15
    assert all(s["name"].endswith(f".{fmt}") for s in index["shards"])
    records = []
    for shard in index["shards"]:
        with fs.open_input_stream(f"{prefix}/selected/{shard['name']}", compression=None) as f:
            body = f.read()
        assert hashlib.sha256(body).hexdigest() == shard["sha256"]
        records += _lines(body, fmt)
    assert len(records) == 15 and all({"id", "cluster", "loss", "meta"} <= set(r) for r in records)
    assert fs.get_file_info(f"{prefix}/_SUCCESS").type == pafs.FileType.File


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz"])
def test_jsonl_outputs_on_a_local_disk(mixed_corpus, ray_cluster, fmt):
    root, jsonl_rows, _ = mixed_corpus
    run(parse_config(_config(root, f"local-{fmt}", format=fmt, annotate=False)))
    index = _index(root / f"local-{fmt}")
    records = [
        r for s in index["shards"] for r in _lines((root / f"local-{fmt}" / "selected" / s["name"]).read_bytes(), fmt)
    ]
    assert len(records) == 15
    assert all(r in jsonl_rows for r in records if not str(r["id"]).startswith("p-"))

"""The selected subset as a training job wants it: the original records, in even shards, with an index.

    OUT/selected/part-00000.<ext>   shards of `output.shard_rows` rows (or about `output.shard_bytes`)
    OUT/selected/_index.json        {format, rows, columns, shards: [{name, rows, bytes, sha256}]}

Two steps, both in Ray tasks; the driver only plans, over one entry per input file and per shard.

1. `write_parts`: one task per input file that has selected rows reads just those records (every field,
   as it came in), attaches raysel's columns and writes them to STAGING/parts/<file index>.parquet.
2. `write_shards`: the parts, in input-file order, are cut into shards of equal row counts. One task per
   shard reads its slices of the parts, casts them to the one schema all shards share, and writes the
   shard in the output format, returning its rows, bytes and sha256 for the index.

The names and contents depend only on the input, the selection and the settings: not on block sizes,
node counts or the order tasks finish in.

JSON is untyped, so one field can hold an int in one row and a string in the next, or an object in one
file and a string in another. Where a lossless common type exists (int and float, or a missing field)
Arrow's permissive promotion finds it; where none does, the field is kept as its JSON text (a string),
in every shard alike. A JSONL output writes each record from its original line, so nothing there is
ever re-typed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysel.io import fs as rfs

RAW_JSON = "__json"  # the record's original JSON line (JSONL inputs), for JSONL outputs
SOURCE, ROW = "__source", "__row"
INDEX = "_index.json"
EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl", "jsonl.gz": ".jsonl.gz", "jsonl.zst": ".jsonl.zst"}
_COMPRESSION = {"jsonl": None, "jsonl.gz": "gzip", "jsonl.zst": "zstd"}
INDEX_KEYS = ("name", "rows", "bytes", "sha256")


# --- records with the types they came with -------------------------------------------------------------------


def records_table(records: list[dict[str, Any]]) -> pa.Table:
    """An Arrow table of JSON records that never fails on their types (see the module docstring)."""
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            columns[name] = pa.array([_json_text(v) for v in values], type=pa.string())
    return pa.table(columns)


def _json_text(value: Any) -> str | None:
    """A value of a field without one type, as text: a string as it is, anything else as its JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def attach_columns(records: pa.Table, attach: pa.Table) -> pa.Table:
    """`records` (any column types, nested included) with `attach`'s columns, matched on (__source, __row).

    Not `Table.join` on the records: Arrow refuses nested non-key columns in a join. Only the keys and a row
    index are joined; the records are then taken by that index."""
    keys = records.select([SOURCE, ROW]).append_column("__i", pa.array(np.arange(records.num_rows)))
    matched = keys.join(attach, keys=[SOURCE, ROW], join_type="inner").sort_by("__i")
    taken = records.take(matched.column("__i"))
    extra = [c for c in attach.column_names if c not in (SOURCE, ROW)]
    taken = taken.drop_columns([c for c in extra if c in taken.column_names])  # raysel's columns win a clash
    for name in extra:
        taken = taken.append_column(name, matched.column(name))
    return taken


# --- step 1: one part per input file ------------------------------------------------------------------------


def write_part(uri: str, rel: str, part_uri: str, *, config: Any, rows: list[int], attach: pa.Table) -> int:
    """Write input file `rel`'s selected `rows` (its records, every field, with `attach`'s columns) to `part_uri`
    as Parquet; returns the rows written."""
    from raysel.io.read import CorpusReader

    reader = CorpusReader(config, keep_rows={rel: rows})
    tables = [attach_columns(records, attach) for records in reader({"uri": [uri], "rel": [rel]})]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return 0
    table = conform_all(tables, shared_schema([t.schema for t in tables], drop=(SOURCE, ROW)))
    fs, path = rfs.resolve(part_uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)
    return table.num_rows


# --- step 2: shards ------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Part:
    uri: str
    rows: int


def part_schema(part: Part) -> pa.Schema:
    fs, path = rfs.resolve(part.uri)
    return pq.read_schema(fs.open_input_file(path))


def shared_schema(schemas: list[pa.Schema], drop: tuple[str, ...] = ()) -> pa.Schema:
    """One schema for tables of differing schemas: each field's types promoted where Arrow can do it losslessly,
    else string (the field's JSON text); fields in `drop` left out."""
    fields: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in drop:
                fields.setdefault(f.name, []).append(f.type)
    out = []
    for name, types in fields.items():
        try:
            unified = pa.unify_schemas([pa.schema([(name, t)]) for t in types], promote_options="permissive")
            out.append(unified.field(name))
        except (pa.ArrowException, TypeError):
            out.append(pa.field(name, pa.string()))
    return pa.schema(out)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` cast to `schema`: missing fields null, fields without a common type as their JSON text."""
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        column = table.column(f.name)
        if column.type == f.type:
            columns.append(column)
            continue
        try:
            columns.append(column.cast(f.type))
        except (pa.ArrowException, TypeError):
            text = [_json_text(v) for v in column.to_pylist()]
            columns.append(pa.array(text, type=pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


def plan_shards(parts: list[Part], shard_rows: int) -> list[list[tuple[str, int, int]]]:
    """Cut the parts, in order, into shards of `shard_rows` rows (the last may be smaller): per shard, a list of
    (part uri, first row, row count) slices."""
    shards: list[list[tuple[str, int, int]]] = [[]]
    room = shard_rows
    for part in parts:
        start = 0
        while start < part.rows:
            if room == 0:
                shards.append([])
                room = shard_rows
            take = min(room, part.rows - start)
            shards[-1].append((part.uri, start, take))
            start += take
            room -= take
    return [s for s in shards if s]


def rows_per_shard(parts: list[Part], *, shard_rows: int | None, shard_bytes: int | None) -> int:
    """`shard_rows`, or the row count whose Parquet size, from the parts' footers, is about `shard_bytes`."""
    if shard_rows is not None:
        return shard_rows
    rows = sum(p.rows for p in parts)
    size = 0
    for part in parts:
        fs, path = rfs.resolve(part.uri)
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return max(1, int(shard_bytes * rows / size)) if size else max(rows, 1)


def write_shard(
    slices: list[tuple[str, int, int]], *, uri: str, schema: pa.Schema, fmt: str, annotate: list[str]
) -> dict[str, Any]:
    """Write one shard to `uri`; returns its index entry {name, rows, bytes, sha256}."""
    tables = []
    for part_uri, start, count in slices:
        fs, path = rfs.resolve(part_uri)
        tables.append(pq.read_table(fs.open_input_file(path)).slice(start, count))
    table = conform_all(tables, schema=shared_schema([t.schema for t in tables]))
    buffer = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(conform(table, schema), buffer)
    else:
        _write_jsonl(table, schema, annotate, buffer, _COMPRESSION[fmt])
    body = buffer.getvalue().to_pybytes()
    fs, path = rfs.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path, compression=None) as out:  # the body is compressed already: no detection
        out.write(body)
    return {"name": uri.rsplit("/", 1)[-1], "rows": table.num_rows, "bytes": len(body), "sha256": _sha256(body)}


def index(fmt: str, schema: pa.Schema, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of OUT/selected/_index.json."""
    shards = [
        {"name": str(e["name"]), "rows": int(e["rows"]), "bytes": int(e["bytes"]), "sha256": str(e["sha256"])}
        for e in entries
    ]
    return {"format": fmt, "rows": sum(s["rows"] for s in shards), "columns": schema.names, "shards": shards}


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def conform_all(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    """Tables of differing schemas as one table of `schema`."""
    return pa.concat_tables([conform(t, schema) for t in tables]) if len(tables) != 1 else conform(tables[0], schema)


def _write_jsonl(
    table: pa.Table, schema: pa.Schema, annotate: list[str], sink: pa.BufferOutputStream, codec: str | None
) -> None:
    """One JSON object a line: the original line's record where there is one (JSONL inputs), else the Arrow
    row; raysel's `annotate` columns added after the record's own fields."""
    raw = table.column(RAW_JSON).to_pylist() if RAW_JSON in table.column_names else [None] * table.num_rows
    plain = conform(table, schema).to_pylist()
    stream = pa.CompressedOutputStream(sink, codec) if codec else sink
    for line, row in zip(raw, plain, strict=True):
        record = json.loads(line) if line is not None else {k: v for k, v in row.items() if k not in annotate}
        record.update({k: row[k] for k in annotate if k in row})
        stream.write((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode())
    if codec:
        stream.close()  # flushes the codec's last frame into the buffer

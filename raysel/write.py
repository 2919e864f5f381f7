"""Pass 4: the selected rows of the staged ledger, joined back to their original records, written as even shards
with an index, in Ray tasks (the per-task steps are raysel/io/selected.py); the driver sees one entry per input
file and per shard."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards
from raysel.config import RunConfig
from raysel.io import fs as rfs
from raysel.io import selected
from raysel.io.read import InputFile
from raysel.io.sink import OutputSink
from raysel.select.stream import IN_MEMORY_ROWS

DEFAULT_SHARD_BYTES = 128 << 20


def write_selected(config: RunConfig, files: list[InputFile], sink: OutputSink, expected_rows: int) -> int:
    """Write the selected rows of the staged ledger, joined back to their original records, as even shards with
    an index (raysel/io/selected.py); returns the rows written, verified by the sink.

    The ledger's selected rows are grouped by input file (a Ray group-by); one task per file reads just those
    records and writes its part. The driver sees one entry per file and per shard."""
    import ray

    out = config.output
    # raysel's own scores only: a score field is one of the record's own fields, and stays as it came in
    annotate = ["id", "cluster", *(s.name for s in config.scorers)] if out.annotate else []
    parts_uri = rfs.join(sink.staging, "parts")
    targets = {f.rel: (f.uri, rfs.join(parts_uri, f"{i:06d}.parquet")) for i, f in enumerate(files)}
    parts: list[selected.Part] = []
    settings = {"config": config.input, "targets": targets, "annotate": annotate, "prefix": out.prefix}
    if expected_rows:
        chosen = read_shards(sink.ledger_uri, columns=["status", "source", "row", *dict.fromkeys(annotate)])
        from ray.data.expressions import col

        # An Arrow predicate at an I/O task's CPUs: a Python lambda per ledger row was a 1-CPU loop over the corpus.
        chosen = chosen.filter(expr=col("status") == "selected", num_cpus=IO_TASK_CPUS)
        if expected_rows <= IN_MEMORY_ROWS:  # a few rows: grouped on the driver, not by a Ray shuffle
            table = pa.concat_tables(chosen.iter_batches(batch_format="pyarrow", batch_size=None))
            sources = sorted(set(table.column("source").to_pylist()))
            ds = ray.data.from_items([{"source": r} for r in sources], override_num_blocks=len(sources))
            ds = ds.map_batches(
                _write_parts, fn_kwargs={"chosen": ray.put(table), **settings}, batch_size=1, num_cpus=IO_TASK_CPUS
            )
        else:
            ds = chosen.groupby("source", num_partitions=max(1, min(len(files), 64))).map_groups(
                _write_part, fn_kwargs=settings, batch_format="pyarrow", num_cpus=IO_TASK_CPUS
            )
        parts = sorted(selected.Part(r["part"], int(r["rows"])) for r in ds.take_all() if r["rows"])
    schema = selected.shared_schema([selected.part_schema(p) for p in parts], drop=(selected.RAW_JSON,))
    rows = selected.rows_per_shard(
        parts, shard_rows=out.shard_rows, shard_bytes=out.shard_bytes or DEFAULT_SHARD_BYTES
    )
    plan = selected.plan_shards(parts, rows)
    ext = selected.EXTENSIONS[out.format]
    shards = [
        {"slices": json.dumps(s), "uri": rfs.join(sink.selected_uri, f"part-{j:05d}{ext}")} for j, s in enumerate(plan)
    ]
    entries: list[dict[str, Any]] = []
    if shards:
        ds = ray.data.from_items(shards, override_num_blocks=len(shards)).map_batches(
            _write_shard,
            fn_kwargs={"schema": schema, "fmt": out.format, "annotate": [out.prefix + c for c in annotate]},
            batch_size=1,
            num_cpus=IO_TASK_CPUS,
        )
        entries = sorted(ds.take_all(), key=lambda e: e["name"])
    rfs.delete_dir(parts_uri)
    return sink.write_selected_index(selected.index(out.format, schema, entries), expected_rows=expected_rows)


def _write_parts(batch: dict[str, np.ndarray], chosen: Any, **settings: Any) -> dict[str, list]:
    import ray

    table = ray.get(chosen) if isinstance(chosen, ray.ObjectRef) else chosen
    out: dict[str, list] = {"part": [], "rows": []}
    for source in batch["source"]:
        part = _write_part(table.filter(pa.compute.equal(table.column("source"), str(source))), **settings)
        out["part"] += part["part"]
        out["rows"] += part["rows"]
    return out


def _write_part(chosen: pa.Table, config: Any, targets: dict, annotate: list[str], prefix: str) -> dict[str, list]:
    """One input file's selected rows (a group of the ledger's), written as its part."""
    rel = chosen.column("source")[0].as_py()
    uri, part = targets[rel]
    attach = chosen.select(["source", "row", *annotate]).rename_columns(
        [selected.SOURCE, selected.ROW, *(prefix + c for c in annotate)]
    )
    rows = chosen.column("row").to_pylist()
    return {"part": [part], "rows": [selected.write_part(uri, rel, part, config=config, rows=rows, attach=attach)]}


def _write_shard(batch: dict[str, np.ndarray], schema: pa.Schema, fmt: str, annotate: list[str]) -> dict[str, list]:
    entries = [
        selected.write_shard(json.loads(str(s)), uri=str(u), schema=schema, fmt=fmt, annotate=annotate)
        for s, u in zip(batch["slices"], batch["uri"], strict=True)
    ]
    return {k: [e[k] for e in entries] for k in selected.INDEX_KEYS}

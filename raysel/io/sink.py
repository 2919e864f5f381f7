"""The output folder of a run, and its commit.

    OUT/ledger/part-*.parquet     one row per input row: id, status, reason, provenance, scores, cluster
    OUT/selected/*.parquet        the selected rows: every input column, plus id, scores, cluster
    OUT/manifest.json             resolved config, counts per status, versions, seconds per pass
    OUT/_SUCCESS                  written last: a folder without it holds no result

The sink refuses to write into a committed output unless told to overwrite, and it checks that
the rows it wrote are the rows it was asked to write before it commits.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysel.errors import SinkError
from raysel.io import fs as rfs

LEDGER_ROWS_PER_FILE = 1_000_000


def is_committed(uri: str) -> bool:
    return rfs.exists(rfs.join(uri, "_SUCCESS"))


class OutputSink:
    def __init__(self, uri: str, *, overwrite: bool = False) -> None:
        self.uri = uri
        self.overwrite = overwrite

    def prepare(self) -> None:
        """Refuse a committed output (unless overwriting); clear what an uncommitted one left behind."""
        if is_committed(self.uri) and not self.overwrite:
            raise SinkError(
                f"{self.uri} already holds a committed run (_SUCCESS exists); pass --overwrite to replace it, "
                "or choose another output.path"
            )
        fs, path = rfs.resolve(self.uri)
        for name in ("_SUCCESS", "manifest.json"):
            target = rfs.join(path, name)
            if rfs.exists(rfs.join(self.uri, name)):
                fs.delete_file(target)
        for name in ("ledger", "selected"):
            rfs.delete_dir(rfs.join(self.uri, name))
        fs.create_dir(path, recursive=True)

    def write_ledger(self, table: pa.Table) -> None:
        fs, path = rfs.resolve(rfs.join(self.uri, "ledger"))
        fs.create_dir(path, recursive=True)
        for part, start in enumerate(range(0, max(table.num_rows, 1), LEDGER_ROWS_PER_FILE)):
            with fs.open_output_stream(f"{path}/part-{part:05d}.parquet") as out:
                pq.write_table(table.slice(start, LEDGER_ROWS_PER_FILE), out)

    def write_selected(self, ds: Any, *, expected_rows: int) -> int:
        """Write a Ray dataset of selected rows; verify the row count from the files' footers."""
        fs, path = rfs.resolve(rfs.join(self.uri, "selected"))
        ds.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": 0.25})
        written = sum(
            pq.ParquetFile(fs.open_input_file(info.path)).metadata.num_rows
            for info in fs.get_file_info(pa.fs.FileSelector(path))
            if info.path.endswith(".parquet")
        )
        if written != expected_rows:
            raise SinkError(f"wrote {written} selected rows where {expected_rows} were chosen; not committing")
        return written

    def commit(self, manifest: dict[str, Any]) -> None:
        """manifest.json, then _SUCCESS: a reader that sees _SUCCESS sees a complete output."""
        rfs.write_text(rfs.join(self.uri, "manifest.json"), json.dumps(manifest, indent=2, default=str))
        rfs.write_text(rfs.join(self.uri, "_SUCCESS"), "")

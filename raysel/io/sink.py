"""The output folder of a run, and its commit.

    OUT/ledger/part-*.parquet     one row per input row: id, status, reason, provenance, scores, cluster
    OUT/selected/*.parquet        the selected rows: every input column, plus id, scores, cluster
    OUT/manifest.json             resolved config, counts per status, versions, seconds per pass
    OUT/_SUCCESS                  written last: a folder without it holds no result

While a run works, its files go under OUT/_staging-<run id>/ and OUT/_run.json says which run
owns the folder and with what config. The commit moves the staged folders into place, then writes
manifest.json, then _SUCCESS. So a reader never sees a half-written result, and a folder is in one
of three states: empty, interrupted (_run.json, no _SUCCESS) or committed (_SUCCESS).

raysel only ever deletes what it owns there: ledger/, selected/, manifest.json, _SUCCESS,
_run.json and _staging-*/.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysel._internal.ray_stage import IO_TASK_CPUS
from raysel.errors import SinkError
from raysel.io import fs as rfs

LEDGER_ROWS_PER_FILE = 1_000_000
_OWNED_FILES = ("_SUCCESS", "manifest.json", "_run.json")
_OWNED_DIRS = ("ledger", "selected")


def is_committed(uri: str) -> bool:
    """True when `uri` holds a complete run (its _SUCCESS exists)."""
    return rfs.exists(rfs.join(uri, "_SUCCESS"))


class OutputSink:
    """Stages a run's output and commits it atomically (see the module docstring).

    Args:
        uri: the output folder, local or s3://.
        overwrite: replace a committed (or interrupted) run in that folder.
        resume: continue an interrupted run in that folder (its config must be the same).
    """

    def __init__(self, uri: str, *, overwrite: bool = False, resume: bool = False) -> None:
        self.uri = uri
        self.overwrite = overwrite
        self.resume = resume
        self.run_id = uuid.uuid4().hex[:12]
        self.staging = rfs.join(uri, f"_staging-{self.run_id}")

    def prepare(self, config_digest: str) -> None:
        """Check the folder's state against --overwrite / --resume and claim it for this run."""
        run_file = rfs.join(self.uri, "_run.json")
        if is_committed(self.uri):
            if not self.overwrite:
                raise SinkError(
                    f"{self.uri} already holds a committed run (_SUCCESS exists); pass --overwrite to replace it, "
                    "or choose another output.path"
                )
            self._clear()
        elif rfs.exists(run_file):
            previous = json.loads(rfs.read_text(run_file))
            if self.resume and previous.get("config") != config_digest:
                raise SinkError(
                    f"{self.uri} holds an interrupted run with a different config; --overwrite to start over"
                )
            if not (self.resume or self.overwrite):
                raise SinkError(
                    f"{self.uri} holds an interrupted run (no _SUCCESS); pass --resume to continue it "
                    "(scores already computed are reused) or --overwrite to start over"
                )
            self._clear()
        rfs.write_text(run_file, json.dumps({"run_id": self.run_id, "config": config_digest}))

    def _clear(self) -> None:
        fs, path = rfs.resolve(self.uri)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and (
                info.base_name in _OWNED_DIRS or info.base_name.startswith("_staging-")
            ):
                fs.delete_dir(info.path)
            elif info.type == pafs.FileType.File and info.base_name in _OWNED_FILES:
                fs.delete_file(info.path)

    def write_ledger(self, table: pa.Table) -> None:
        fs, path = rfs.resolve(rfs.join(self.staging, "ledger"))
        fs.create_dir(path, recursive=True)
        for part, start in enumerate(range(0, max(table.num_rows, 1), LEDGER_ROWS_PER_FILE)):
            with fs.open_output_stream(f"{path}/part-{part:05d}.parquet") as out:
                pq.write_table(table.slice(start, LEDGER_ROWS_PER_FILE), out)

    def write_selected(self, ds: Any, *, expected_rows: int) -> int:
        """Write a Ray dataset of selected rows; verify the row count from the files' footers."""
        fs, path = rfs.resolve(rfs.join(self.staging, "selected"))
        fs.create_dir(path, recursive=True)
        if ds is not None:
            ds.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": IO_TASK_CPUS})
        written = rfs.parquet_rows(rfs.join(self.staging, "selected"))
        if written != expected_rows:
            raise SinkError(f"wrote {written} selected rows where {expected_rows} were chosen; not committing")
        return written

    def commit(self, manifest: dict[str, Any]) -> None:
        """Move the staged folders into place, then manifest.json, then _SUCCESS."""
        for name in _OWNED_DIRS:
            rfs.delete_dir(rfs.join(self.uri, name))
            rfs.move_dir(rfs.join(self.staging, name), rfs.join(self.uri, name))
        rfs.delete_dir(self.staging)
        rfs.write_text(rfs.join(self.uri, "manifest.json"), json.dumps(manifest, indent=2, default=str))
        rfs.write_text(rfs.join(self.uri, "_SUCCESS"), "")
        fs, path = rfs.resolve(rfs.join(self.uri, "_run.json"))
        fs.delete_file(path)

"""Reading a corpus: stable ids, and a quarantine reason instead of a crash for every unusable row.

A corpus is a list of files (JSONL or Parquet, local or s3://). `CorpusReader` turns a batch of
file descriptors into row batches and is Ray-agnostic: the pipeline runs it in a `map_batches`
over the file list (one task per file, streaming: it yields a batch every `rows_per_batch` rows,
small enough that the actor stages downstream stream and show progress block by block), and
tests call it on plain dicts.

Every row that comes out has these columns:
    id          the `id_field` value as a string, else sha1(relative file path : row number)[:16]
    text        the text ("" for a quarantined row), cut at `max_chars`
    label       the `label_field` value as a string (only when a label field is configured)
    source      the file, relative to the input root
    row         the row number in that file (0-based; for JSONL, the line number - 1)
    reason      "" for a usable row, else why it is quarantined
    text_cut    True when the text was longer than `max_chars` and was cut
A file that cannot be opened at all yields one quarantine row with row = -1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raysel.config import InputConfig
from raysel.errors import InputError
from raysel.io import fs as rfs

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_CHUNK = 8 << 20


@dataclass(frozen=True)
class InputFile:
    uri: str
    rel: str
    size: int
    mtime_ns: int

    @property
    def format(self) -> str:
        return "parquet" if self.uri.endswith(PARQUET_SUFFIXES) else "jsonl"


def list_input(cfg: InputConfig) -> list[InputFile]:
    suffixes = {"auto": JSONL_SUFFIXES + PARQUET_SUFFIXES, "jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES}
    files = [InputFile(*f) for f in rfs.list_files(cfg.path, suffixes[cfg.format])]
    if not files:
        raise InputError(f"input.path {cfg.path!r} holds no {'/'.join(suffixes[cfg.format])} files")
    return files


def check_input(files: list[InputFile], cfg: InputConfig) -> None:
    """Fail before any work when the corpus as a whole cannot be used (e.g. no file has the text column)."""
    import pyarrow.parquet as pq

    seen_columns: set[str] = set()
    for f in files[:32]:
        fs, path = rfs.resolve(f.uri)
        try:
            if f.format == "parquet":
                seen_columns.update(pq.ParquetFile(fs.open_input_file(path)).schema_arrow.names)
            else:
                with fs.open_input_stream(path) as stream:
                    head = stream.read(1 << 20).decode("utf-8", errors="replace").splitlines()[:100]
                for line in head:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict):
                        seen_columns.update(rec)
        except (OSError, pa.ArrowInvalid):
            continue  # an unreadable file is quarantined row by row later
        if cfg.text_field in seen_columns:
            return
    if seen_columns:
        raise InputError(
            f"no input file has the text field {cfg.text_field!r} (columns seen: {sorted(seen_columns)[:20]}); "
            f"set input.text_field"
        )


def stable_id(rel: str, row: int) -> str:
    return hashlib.sha1(f"{rel}:{row}".encode()).hexdigest()[:16]


class CorpusReader:
    """Reads files into row batches (see the module docstring for the columns).

    With `skip_rows` ({relative file: row numbers}), those rows are not emitted: a resumed pass 1
    skips the rows an interrupted run already scored.

    With `keep_rows` ({relative file: row numbers}), yields instead the full original records of
    just those rows as Arrow tables, plus `__source` and `__row`: that is how the selected subset is
    joined back to the input (all columns, original types), exactly, even where ids repeat.

    Example:
        >>> reader = CorpusReader(InputConfig(path="corpus.jsonl"))            # doctest: +SKIP
        >>> for batch in reader({"uri": ["corpus.jsonl"], "rel": ["corpus.jsonl"]}): ...
    """

    def __init__(
        self,
        config: InputConfig,
        *,
        rows_per_batch: int = 512,
        keep_rows: dict[str, Any] | None = None,
        skip_rows: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.rows_per_batch = rows_per_batch
        self.skip_rows = {k: frozenset(int(r) for r in v) for k, v in (skip_rows or {}).items()}
        self.labels = None if config.labels is None else frozenset(config.labels)
        self.keep_rows = None if keep_rows is None else {k: frozenset(int(r) for r in v) for k, v in keep_rows.items()}

    def __call__(self, files: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray] | pa.Table]:
        for uri, rel in zip(files["uri"], files["rel"], strict=True):
            if str(uri).endswith(PARQUET_SUFFIXES):
                yield from self._parquet(str(uri), str(rel))
            else:
                yield from self._jsonl(str(uri), str(rel))

    # --- JSONL -------------------------------------------------------------------------------------------
    def _jsonl(self, uri: str, rel: str) -> Iterator[dict[str, np.ndarray] | pa.Table]:
        rows: list[tuple] = []
        records: list[dict] = []
        skip = self.skip_rows.get(rel, frozenset())
        fs, path = rfs.resolve(uri)
        try:
            stream = fs.open_input_stream(path)
        except OSError as err:
            if -1 not in skip:
                yield self._rows([(stable_id(rel, -1), "", None, rel, -1, f"unreadable file: {err}", False)])
            return
        with stream:
            for row, raw in enumerate(_lines(stream)):
                if not raw.strip() or row in skip:
                    continue  # a blank line is no record
                if self.keep_rows is not None:
                    if row in self.keep_rows.get(rel, ()):
                        records.append({**_parse_json_line(raw)[0], "__source": rel, "__row": row})
                    if len(records) >= self.rows_per_batch:
                        yield pa.Table.from_pylist(records)
                        records = []
                    continue
                rows.append(self._row(*_parse_json_line(raw), rel, row))
                if len(rows) >= self.rows_per_batch:
                    yield self._rows(rows)
                    rows = []
        if rows:
            yield self._rows(rows)
        if records:
            yield pa.Table.from_pylist(records)

    # --- Parquet -----------------------------------------------------------------------------------------
    def _parquet(self, uri: str, rel: str) -> Iterator[dict[str, np.ndarray] | pa.Table]:
        import pyarrow.parquet as pq

        fs, path = rfs.resolve(uri)
        row = 0
        try:
            pf = pq.ParquetFile(fs.open_input_file(path))
            batches = pf.iter_batches(batch_size=self.rows_per_batch)
            for batch in batches:
                if self.keep_rows is not None:
                    wanted = self.keep_rows.get(rel, frozenset())
                    rows_here = np.arange(row, row + batch.num_rows)
                    keep = np.isin(rows_here, np.fromiter(wanted, dtype=np.int64, count=len(wanted)))
                    if keep.any():
                        table = pa.Table.from_batches([batch]).filter(pa.array(keep))
                        yield table.append_column("__source", pa.array([rel] * table.num_rows)).append_column(
                            "__row", pa.array(rows_here[keep])
                        )
                else:
                    skip = self.skip_rows.get(rel, frozenset())
                    records = batch.to_pylist()
                    rows = [self._row(r, "", rel, row + i) for i, r in enumerate(records) if row + i not in skip]
                    if rows:
                        yield self._rows(rows)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as err:
            if self.keep_rows is None and -1 not in self.skip_rows.get(rel, frozenset()):
                reason = f"unreadable parquet file after {row} rows: {err}"
                yield self._rows([(stable_id(rel, -1), "", None, rel, -1, reason, False)])

    # --- rows --------------------------------------------------------------------------------------------
    def _id(self, record: dict | None, rel: str, row: int) -> tuple[str, str]:
        """(id, reason): the id field as a string, else the hash of file and row."""
        field = self.config.id_field
        if field is None or record is None:
            return stable_id(rel, row), ""
        value = record.get(field)
        if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
            return stable_id(rel, row), f"missing or invalid id field {field!r}"
        return str(value), ""

    def _row(self, record: dict | None, reason: str, rel: str, row: int) -> tuple:
        cfg = self.config
        rid, id_reason = self._id(record, rel, row)
        text, label, cut = "", None, False
        if record is not None and not reason:
            reason = id_reason
            value = record.get(cfg.text_field)
            if cfg.text_field not in record:
                reason = reason or f"missing text field {cfg.text_field!r}"
            elif not isinstance(value, str):
                reason = reason or f"text is not a string ({type(value).__name__})"
            elif not value.strip():
                reason = reason or "empty text"
            else:
                text, cut = value[: cfg.max_chars], len(value) > cfg.max_chars
            if cfg.label_field is not None:
                label = record.get(cfg.label_field)
                if label is None or isinstance(label, (dict, list)):
                    reason = reason or f"missing label field {cfg.label_field!r}"
                    label = None
                else:
                    label = str(label)
                    if self.labels is not None and label not in self.labels:
                        reason = reason or f"label {label!r} is not in input.labels"
        if reason:
            text, cut = "", False
        return (rid, text, label, rel, row, reason, cut)

    def _rows(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        ids, texts, labels, sources, nums, reasons, cuts = zip(*rows, strict=True)
        out = {
            "id": np.array(ids, dtype=object),
            "text": np.array(texts, dtype=object),
            "source": np.array(sources, dtype=object),
            "row": np.array(nums, dtype=np.int64),
            "reason": np.array(reasons, dtype=object),
            "text_cut": np.array(cuts, dtype=bool),
        }
        if self.config.label_field is not None:
            out["label"] = np.array(["" if v is None else v for v in labels], dtype=object)
        return out


def _lines(stream: Any) -> Iterator[bytes]:
    """Lines of a binary stream, read in large chunks (pyarrow streams have no line iterator)."""
    tail = b""
    while chunk := stream.read(_CHUNK):
        parts = (tail + chunk).split(b"\n")
        tail = parts.pop()
        yield from parts
    if tail:
        yield tail


def _parse_json_line(raw: bytes) -> tuple[dict | None, str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"undecodable bytes (not utf-8 at byte {err.start})"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"malformed JSON: {err.msg} at column {err.colno}"
    if not isinstance(record, dict):
        return None, f"not a JSON object ({type(record).__name__})"
    return record, ""

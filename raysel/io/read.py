"""Reading a corpus: stable ids, and a quarantine reason instead of a crash for every unusable row.

A corpus is a list of files (JSONL, plain or gzip/zstd/bz2-compressed, or Parquet; local or s3://;
docs/formats.md). `CorpusReader` turns a batch of
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
    <field>     for each of `score_fields`: the field's value as float64; NaN (unscored) when the field is
                missing, null, not a number (a bool or a numeric string such as "0.7" is not one) or not finite
A file that cannot be opened at all yields one quarantine row with row = -1, and so does the rest of a
compressed file whose stream breaks (cut off or damaged): the rows before the break are kept.
"""

from __future__ import annotations

import codecs
import decimal
import hashlib
import json
import logging
import math
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raysel.config import InputConfig
from raysel.errors import InputError
from raysel.io import fs as rfs
from raysel.io.selected import records_table

log = logging.getLogger(__name__)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}  # suffix -> pyarrow codec; JSONL only
ACCEPTED = ".jsonl, .json, .ndjson (each also as .gz, .zst, .bz2), .parquet"
_CHUNK = 8 << 20
# pyarrow's decompressing read() returns nothing of a call that fails, so a broken stream loses what
# that call had decompressed: small reads keep nearly every line before the damage
_COMPRESSED_CHUNK = 64 << 10
_SKIPPED_SHOWN = 5


def file_format(name: str) -> tuple[str | None, str | None]:
    """(format, compression) of a file from its name's suffixes, in any case: ("jsonl", "zstd") for
    a.JSONL.zst, ("parquet", None) for b.parquet, (None, ...) for a file that is no input."""
    stem, suffix = posixpath.splitext(name.lower())
    compression = COMPRESSIONS.get(suffix)
    if compression is not None:
        return ("jsonl" if stem.endswith(JSONL_SUFFIXES) else None), compression
    if suffix in PARQUET_SUFFIXES:
        return "parquet", None
    return ("jsonl" if suffix in JSONL_SUFFIXES else None), None


@dataclass(frozen=True)
class InputFile:
    uri: str
    rel: str
    size: int
    mtime_ns: int

    @property
    def format(self) -> str | None:
        return file_format(self.uri)[0]

    @property
    def compression(self) -> str | None:
        return file_format(self.uri)[1]


class InputFiles(list):
    """The files a run reads, plus `skipped`: the files the input path named that are of no accepted format
    (relative paths, sorted). Hidden and `_`-prefixed files are not among them: they are never input."""

    def __init__(self, files: Iterable[InputFile] = (), skipped: Iterable[str] = ()) -> None:
        super().__init__(files)
        self.skipped = tuple(skipped)


def list_input(cfg: InputConfig) -> InputFiles:
    """The files of `input.path` of the configured format; the others are logged and kept in `.skipped`.

    Raises:
        InputError: the path does not exist, names a single file of no accepted format, or holds none.
    """
    wanted = ("jsonl", "parquet") if cfg.format == "auto" else (cfg.format,)
    listed = [InputFile(*f) for f in rfs.list_files(cfg.path)]
    files = InputFiles(
        (f for f in listed if f.format in wanted), skipped=(f.rel for f in listed if f.format not in wanted)
    )
    if not files:
        if not rfs.is_glob(cfg.path) and rfs.is_file(cfg.path):  # named on its own: "skipped" would hide it
            raise InputError(f"input.path {cfg.path!r} is not an input file (accepted: {_accepted(cfg)})")
        raise InputError(f"input.path {cfg.path!r} holds no input files (accepted: {_accepted(cfg)})")
    if files.skipped:
        shown = ", ".join(files.skipped[:_SKIPPED_SHOWN]) + (", ..." if len(files.skipped) > _SKIPPED_SHOWN else "")
        log.warning(
            "input.path %r: skipped %d files of no accepted format (%s): %s", cfg.path, len(files.skipped), _accepted(cfg), shown
        )
    return files


def _accepted(cfg: InputConfig) -> str:
    return {"auto": ACCEPTED, "jsonl": ACCEPTED.rsplit(", ", 1)[0], "parquet": ".parquet"}[cfg.format]


def open_jsonl(uri: str) -> Any:
    """A stream of a JSONL file's bytes, decompressed as it is read when its suffix names a codec."""
    fs, path = rfs.resolve(uri)
    return fs.open_input_stream(path, compression=file_format(uri)[1])


def check_input(files: list[InputFile], cfg: InputConfig) -> None:
    """Fail before any work when the corpus as a whole cannot be used (e.g. no file has the text column)."""
    import pyarrow.parquet as pq

    seen_columns: set[str] = set()
    for read, f in enumerate(files[:32], start=1):
        try:
            if f.format == "parquet":
                fs, path = rfs.resolve(f.uri)
                seen_columns.update(pq.ParquetFile(fs.open_input_file(path)).schema_arrow.names)
            else:
                with open_jsonl(f.uri) as stream:
                    head = stream.read(1 << 20).decode("utf-8-sig", errors="replace").splitlines()[:100]
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
            # a misspelt score field would leave every row unscored: say so before the run
            if absent := [name for name in cfg.score_fields if name not in seen_columns]:
                log.warning(
                    "input.score_fields %s: no such column in the first %d input file(s) (columns seen: %s); "
                    "check the names: a row without the field is unscored",
                    absent,
                    read,
                    ", ".join(sorted(seen_columns)[:20]),
                )
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
    just those rows as Arrow tables, plus `__source` and `__row` (and, from JSONL, `__json`: the original
    line): that is how the selected subset is joined back to the input (all columns, original types),
    exactly, even where ids repeat. JSON fields without one type are handled by io/selected.records_table.

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
            if file_format(str(uri))[0] == "parquet":
                yield from self._parquet(str(uri), str(rel))
            else:
                yield from self._jsonl(str(uri), str(rel))

    # --- JSONL -------------------------------------------------------------------------------------------
    def _jsonl(self, uri: str, rel: str) -> Iterator[dict[str, np.ndarray] | pa.Table]:
        rows: list[tuple] = []
        records: list[dict] = []
        skip = self.skip_rows.get(rel, frozenset())
        try:
            stream = open_jsonl(uri)
        except OSError as err:
            if -1 not in skip:
                yield self._rows([self._file_row(rel, f"unreadable file: {err}")])
            return
        lines = _Lines(stream, compressed=file_format(uri)[1] is not None)
        with stream:
            for row, raw in enumerate(lines):
                if row == 0:
                    raw = raw.removeprefix(codecs.BOM_UTF8)  # some editors start UTF-8 files with a BOM
                if not raw.strip() or row in skip:
                    continue  # a blank line is no record
                parsed = _parse_json_line(raw, self.config.text_field)
                if self.keep_rows is not None:
                    if row in self.keep_rows.get(rel, ()):
                        records.append({**parsed[0], "__source": rel, "__row": row, "__json": raw.decode()})
                    if len(records) >= self.rows_per_batch:
                        yield records_table(records)
                        records = []
                    continue
                rows.append(self._row(*parsed, rel, row))
                if len(rows) >= self.rows_per_batch:
                    yield self._rows(rows)
                    rows = []
        if lines.error is not None and self.keep_rows is None and -1 not in skip:
            reason = f"compressed stream broken after line {lines.count}: {lines.error}"
            rows.append(self._file_row(rel, reason))
        if rows:
            yield self._rows(rows)
        if records:
            yield records_table(records)

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
                yield self._rows([self._file_row(rel, reason)])

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
        scores = tuple(score_value(None if record is None else record.get(f)) for f in cfg.score_fields)
        return (rid, text, label, rel, row, reason, cut, scores)

    def _file_row(self, rel: str, reason: str) -> tuple:
        """The one quarantine row (row -1) that stands for an unreadable file or the rest of a broken one."""
        return (stable_id(rel, -1), "", None, rel, -1, reason, False, (math.nan,) * len(self.config.score_fields))

    def _rows(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        ids, texts, labels, sources, nums, reasons, cuts, scores = zip(*rows, strict=True)
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
        values = np.array(scores, dtype=np.float64).reshape(len(rows), len(self.config.score_fields))
        for j, name in enumerate(self.config.score_fields):
            out[name] = values[:, j].copy()
        return out


def score_value(value: Any) -> float:
    """A score field's value as a float, or NaN (unscored) when it is no finite number.

    JSON numbers and Parquet integer, float and decimal values are numbers. A bool is not (a flag is no score:
    True would rank as 1.0), nor is a string, even "0.7" (another tool wrote text there, not a score), nor
    null, a list or an object; NaN and ±Infinity (JSON tokens Python accepts) are unscored too, so that
    they cannot rank first. An integer too large for a float is unscored.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
        return math.nan
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


class _Lines:
    """The lines of a binary stream, read in large chunks (pyarrow streams have no line iterator).

    For a compressed stream, a read that fails (a file cut off or damaged) ends the lines instead of
    raising: `error` keeps why, `count` says how many whole lines came before. The partial line at the
    break is not one of them. A plain file's read error is raised: the file may be fine, the store at fault.
    """

    def __init__(self, stream: Any, *, compressed: bool) -> None:
        self.stream = stream
        self.chunk = _COMPRESSED_CHUNK if compressed else _CHUNK
        self.catch = (OSError, pa.ArrowException) if compressed else ()
        self.count = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[bytes]:
        tail = b""
        while True:
            try:
                chunk = self.stream.read(self.chunk)
            except self.catch as err:
                self.error = err
                return
            if not chunk:
                break
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            for part in parts:
                self.count += 1
                yield part
        if tail:
            self.count += 1
            yield tail


def _parse_json_line(raw: bytes, text_field: str) -> tuple[dict | None, str]:
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
    if b"\\u" in raw and (reason := _invalid_unicode(record, text_field)):  # only a \u escape makes one
        return None, reason
    return record, ""


def _invalid_unicode(record: dict, text_field: str) -> str:
    """Why a record holds a string with a lone surrogate ("\\ud800" is valid JSON), else "".

    Such a string is no Unicode text: it cannot be encoded to UTF-8, so no tokenizer or Arrow column
    takes it, and one such row would fail the whole run downstream.
    """
    for key, value in record.items():
        if (at := _surrogate_at(value)) is not None:
            what = "text" if key == text_field else f"field {key!r}"
            return f"{what} is not valid unicode (lone surrogate at character {at})"
        if _surrogate_at(key) is not None:
            return f"field {key!a} is not valid unicode (lone surrogate in its name)"
    return ""


def _surrogate_at(value: Any) -> int | None:
    """The position of the first lone surrogate in a string, or in any string inside a list or dict."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return err.start
        return None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((at for item in value if (at := _surrogate_at(item)) is not None), None)
    return None

"""Filesystems through pyarrow.fs: a local path or an s3:// URI, resolved in one place.

Credentials come from the standard AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_PROFILE / instance roles) and are never logged; AWS_ENDPOINT_URL points at any S3-compatible
server. Every Ray worker that reads or writes s3:// needs the same environment. Small reads and
writes here are retried with backoff on transient errors (an object store that refuses for a few
seconds); pyarrow's own S3 retry strategy covers the requests inside each call.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import posixpath
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow.fs as pafs

from raysel.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_DELAYS = (0.5, 1, 2, 4, 8)  # ~15 s in all: rides out a restarting object store


def retried(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry an object-store call on OSError with exponential backoff; local paths fail at once."""

    @functools.wraps(fn)
    def wrapper(uri: str, *args, **kwargs) -> T:
        delays = RETRY_DELAYS if uri.startswith("s3://") else ()
        for delay in delays:
            try:
                return fn(uri, *args, **kwargs)
            except (FileNotFoundError, InputError):
                raise
            except OSError as err:
                log.warning("%s(%s) failed (%s); retrying in %ss", fn.__name__, uri, err, delay)
                time.sleep(delay)
        return fn(uri, *args, **kwargs)

    return wrapper


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). s3:// honours AWS_ENDPOINT_URL / AWS_* credentials from the environment."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {"region": os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))}
        if endpoint:
            scheme, _, host = endpoint.rpartition("://")
            kwargs.update(endpoint_override=host or endpoint, scheme=scheme or "https")
        fs = pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=6), **kwargs)
        return fs, uri.removeprefix("s3://").rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return base.rstrip("/") + "/" + "/".join(parts) if base.startswith("s3://") else os.path.join(base, *parts)


@retried
def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@retried
def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@retried
def write_text(uri: str, text: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


@retried
def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


@retried
def list_files(uri: str, suffixes: tuple[str, ...]) -> list[tuple[str, str, int, int]]:
    """Files under a file, folder or glob: (uri, path relative to the input root, size, mtime_ns), sorted.

    The relative path is what stable ids are derived from, so moving a corpus folder keeps its ids.
    """
    fs, path = resolve(uri)
    prefix = "s3://" if uri.startswith("s3://") else ""
    if any(ch in path for ch in "*?["):
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input.path {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            root, infos = posixpath.dirname(path), [info]
        else:
            root, infos = path, fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [
        (prefix + i.path, posixpath.relpath(i.path, root), i.size or 0, i.mtime_ns or 0)
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffixes) and not i.base_name.startswith((".", "_"))
    ]
    return sorted(files)


@retried
def move_dir(src: str, dst: str) -> None:
    """A rename on a local disk; on S3 (no renames) a copy of each object, then a delete."""
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(dst_path), recursive=True)
        fs.move(src_path, dst_path)
        return
    for info in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, dst_path + info.path[len(src_path) :])
    fs.delete_dir(src_path)


@retried
def parquet_rows(uri: str) -> int:
    """Rows in the Parquet files of a folder, from their footers alone (no column is read)."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    return sum(
        pq.ParquetFile(fs.open_input_file(info.path)).metadata.num_rows
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.path.endswith(".parquet")
    )


FINGERPRINT_BYTES = 1 << 20


@retried
def fingerprint(uri: str) -> str:
    """A hash of a file's size and its first and last MiB: cheap on a TB corpus, and it sees most edits."""
    import hashlib

    fs, path = resolve(uri)
    size = fs.get_file_info(path).size or 0
    digest = hashlib.sha256(str(size).encode())
    with fs.open_input_file(path) as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        if size > 2 * FINGERPRINT_BYTES:
            handle.seek(size - FINGERPRINT_BYTES)
            digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def settings_digest(settings: object) -> str:
    """A digest of settings in which a string naming an existing file stands for that file's content too, so
    a cache keyed by it notices a file rewritten under the same name (a scorer's target set, say)."""
    import hashlib
    import json

    def with_content(value: object) -> object:
        if isinstance(value, dict):
            return {k: with_content(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [with_content(v) for v in value]
        if isinstance(value, str) and ("/" in value or value.endswith((".jsonl", ".json", ".parquet"))):
            try:
                kind = resolve(value)[0].get_file_info(resolve(value)[1]).type
            except (OSError, ValueError):
                return value
            if kind == pafs.FileType.File:
                return f"{value}#{fingerprint(value)}"
        return value

    blob = json.dumps(with_content(settings), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

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
def is_file(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


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


WILDCARDS = "*?["


def is_glob(uri: str) -> bool:
    return any(ch in uri for ch in WILDCARDS)


def _missing(uri: str) -> str:
    """Says that a path does not exist; a relative one says where it was looked for."""
    relative = not uri.startswith("s3://") and not os.path.isabs(os.path.expanduser(uri))
    return f"input.path {uri!r} does not exist" + (f" (relative to {os.getcwd()})" if relative else "")


def glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Shell / pathlib semantics on path levels: `*`, `?`, `[..]` inside one level, `**` any levels (even none)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and glob_match(parts[1:], pattern[1:])


def _ignored(rel: str) -> bool:
    """Hidden and `_`-prefixed files and folders (.git, _SUCCESS, _staging-*) are never input."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


@retried
def list_files(uri: str) -> list[tuple[str, str, int, int]]:
    """Files of a file, folder or glob: (uri, path relative to the input root, size, mtime_ns), sorted.

    A folder is walked to any depth; a glob's root is its folder before the first wildcard. Hidden and
    `_`-prefixed files and folders below the root are left out; a file named on its own is listed
    whatever its name. The relative path is what stable ids are derived from, so moving a corpus folder
    keeps its ids.

    Raises:
        InputError: the path, or a glob's folder, does not exist.
    """
    fs, path = resolve(uri)
    prefix = "s3://" if uri.startswith("s3://") else ""
    if is_glob(path):
        levels = path.split("/")
        first = next(i for i, level in enumerate(levels) if is_glob(level))
        root, pattern = "/".join(levels[:first]) or "/", levels[first:]
        kind = fs.get_file_info(root).type
        if kind != pafs.FileType.Directory:
            problem = "does not exist" if kind == pafs.FileType.NotFound else "is not a folder"
            raise InputError(f"input.path {uri!r}: the folder {prefix + root!r} {problem}")
        # a pattern of one level needs no walk (listing a large prefix of an object store takes many requests)
        selector = pafs.FileSelector(root, recursive=len(pattern) > 1 or "**" in pattern)
        infos = [i for i in fs.get_file_info(selector) if glob_match(posixpath.relpath(i.path, root).split("/"), pattern)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(_missing(uri))
        if info.type == pafs.FileType.File:
            return [(prefix + info.path, info.base_name, info.size or 0, info.mtime_ns or 0)]
        root, infos = path, fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [
        (prefix + i.path, rel, i.size or 0, i.mtime_ns or 0)
        for i in infos
        if i.type == pafs.FileType.File and not _ignored(rel := posixpath.relpath(i.path, root))
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


FINGERPRINT_BYTES = 1 << 20  # the head and the tail sampled from a file too large to hash whole
FULL_HASH_BYTES = 256 << 20  # local files up to this size are hashed whole (~0.5 s each on one core)


def fingerprint_method(uri: str, size: int, mtime_ns: int) -> str:
    """How `fingerprint` keys a file: "sha256" (all its bytes), "mtime+size+sampled" or "size+sampled".

    A local file under FULL_HASH_BYTES is hashed whole: its modification time can be set back (os.utime,
    cp -p, rsync -t), so only the content is proof. Object-store objects (pyarrow exposes no ETag) and
    larger local files are keyed by modification time, size and their first and last MiB: an object is
    replaced whole, and every write sets its modification time, which no client can set back.
    """
    if not uri.startswith("s3://") and size <= FULL_HASH_BYTES:
        return "sha256"
    return "mtime+size+sampled" if mtime_ns else "size+sampled"


@retried
def fingerprint(uri: str) -> str:
    """A hash that changes when the file's content does, by `fingerprint_method`; part of reuse keys."""
    import hashlib

    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    size, mtime_ns = info.size or 0, info.mtime_ns or 0
    method = fingerprint_method(uri, size, mtime_ns)
    digest = hashlib.sha256(f"{method}:{size}".encode())
    with fs.open_input_file(path) as handle:
        if method == "sha256":
            # 1 MiB reads: glibc keeps a freed 8 MiB read in each hashing thread's arena (~60 MiB of driver
            # memory for the rest of the run, with 6 threads), a 1 MiB one costs a few.
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(f":{mtime_ns}".encode() if mtime_ns else b"")
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                handle.seek(size - FINGERPRINT_BYTES)
                digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def fingerprints(uris: list[str]) -> list[str]:
    """`fingerprint` of each file, in threads: hashing and pyarrow's reads release the GIL, and an object
    store's requests mostly wait on the network."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) + 4)) as pool:
        return list(pool.map(fingerprint, uris))


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

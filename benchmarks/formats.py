"""Reading compressed corpora and writing the selected shards, in-process (no Ray), on one corpus.

For each input format: rows/s through `CorpusReader` (what a pass-1 read task runs) and the reader's
peak memory above the baseline (streamed: it must not grow with the file). For each output format:
rows/s of `selected.write_shard` and the shard's size. And what the reuse key's fingerprint costs per
GiB of input: the full sha256 raysel uses for local files up to 256 MiB, against the sampled one.

    .venv/bin/python benchmarks/formats.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from raysel.config import InputConfig
from raysel.io import fs as rfs
from raysel.io import selected
from raysel.io.read import CorpusReader


def corpus_rows(n: int) -> list[dict]:
    from raysel.demo import bbc_articles

    articles = bbc_articles()
    return [
        {"id": f"d{i}", "text": articles[i % len(articles)]["text"][:1500], "meta": {"topic": "x", "n": i}}
        for i in range(n)
    ]


def write_inputs(root: Path, rows: list[dict]) -> dict[str, Path]:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    paths = {"jsonl": root / "c.jsonl"}
    paths["jsonl"].write_bytes(body)
    for ext, codec in (("jsonl.gz", "gzip"), ("jsonl.zst", "zstd"), ("jsonl.bz2", "bz2")):
        paths[ext] = root / f"c.{ext}"
        with pa.CompressedOutputStream(str(paths[ext]), codec) as f:
            f.write(body)
    paths["parquet"] = root / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


class PeakRSS:
    """The process's peak RSS above its level at the start, sampled every 10 ms."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def read_rate(path: Path) -> tuple[float, int, float]:
    reader = CorpusReader(InputConfig(path=str(path), id_field="id"))
    with PeakRSS() as mem:
        start = time.perf_counter()
        rows = sum(len(b["id"]) for b in reader({"uri": [str(path)], "rel": [path.name]}))
        seconds = time.perf_counter() - start
    return rows / seconds, rows, mem.mib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    rows = corpus_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_inputs(root, rows)
        print(f"corpus: {args.rows} rows, {paths['jsonl'].stat().st_size / 2**20:.0f} MiB as JSONL\n")
        print("| input | file MiB | rows/s (CorpusReader) | vs .jsonl | peak RSS above start, MiB |")
        print("| --- | --- | --- | --- | --- |")
        base = None
        for fmt, path in paths.items():
            rate, n, mib = read_rate(path)
            assert n == args.rows, (fmt, n)
            base = base or rate
            size = path.stat().st_size / 2**20
            print(f"| .{fmt} | {size:.1f} | {rate:,.0f} | {rate / base:.2f} | {mib:.0f} |")

        part = root / "part.parquet"
        table = selected.records_table([{**r, "__json": json.dumps(r)} for r in rows[:50_000]])
        pq.write_table(table, part)
        schema = selected.shared_schema([table.schema], drop=(selected.RAW_JSON,))
        print(f"\n| output | rows/s (write_shard, {table.num_rows:,} rows) | shard MiB |")
        print("| --- | --- | --- |")
        for fmt in ("parquet", "jsonl", "jsonl.gz", "jsonl.zst"):
            uri = str(root / f"shard{selected.EXTENSIONS[fmt]}")
            start = time.perf_counter()
            entry = selected.write_shard(
                [(str(part), 0, table.num_rows)], uri=uri, schema=schema, fmt=fmt, annotate=[]
            )
            seconds = time.perf_counter() - start
            print(f"| {fmt} | {entry['rows'] / seconds:,.0f} | {entry['bytes'] / 2**20:.1f} |")

        big = root / "big.bin"
        with open(big, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(1 << 20))
        os.sync()
        for label, fn in (("sha256 of the whole file", rfs.fingerprint), ("size + mtime + first/last MiB", None)):
            start = time.perf_counter()
            if fn is not None:
                fn(str(big))
            else:
                with open(big, "rb") as f:
                    f.read(1 << 20)
                    f.seek(-(1 << 20), 2)
                    f.read(1 << 20)
            seconds = time.perf_counter() - start
            print(f"\nfingerprint, {label}: {seconds:.3f} s per 256 MiB ({seconds * 4:.2f} s per GiB, page cache warm)")
    print(f"\nmax RSS of the benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

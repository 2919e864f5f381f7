"""Input, work dir and output on a real S3 server (SeaweedFS on loopback)."""

import bz2
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raysel.config import InputConfig, parse_config
from raysel.errors import InputError
from raysel.io import fs as rfs
from raysel.io.read import CorpusReader, check_input, list_input
from raysel.pipeline import run
from tests.conftest import bbc_sample, tiny_lm

BUCKET = "raysel-test"


def _config(prefix: str, **select) -> dict:
    return {
        "input": {"path": f"s3://{BUCKET}/{prefix}/corpus", "id_field": "id", "label_field": "topic"},
        "output": {"path": f"s3://{BUCKET}/{prefix}/out"},
        "embed": {"batch_size": 16, "max_tokens": 32},
        "scorers": [{"name": "loss", "model": tiny_lm(), "max_tokens": 12, "batch_size": 8}],
        "cluster": {"k": 2},
        "select": {"budget": 5, "policy": "topk", "score": "loss", **select},
        "work_dir": f"s3://{BUCKET}/{prefix}/work",
    }


def _upload_corpus(s3, prefix: str, rows: list[dict]) -> None:
    """Half as JSONL with a broken line, half as Parquet: both formats through S3."""
    fs = s3.filesystem()
    half = len(rows) // 2
    body = b"".join(json.dumps(r).encode() + b"\n" for r in rows[:half]) + b'{"id": "broken", "text": \n'
    with fs.open_output_stream(f"{BUCKET}/{prefix}/corpus/a.jsonl") as f:
        f.write(body)
    with fs.open_output_stream(f"{BUCKET}/{prefix}/corpus/b.parquet") as f:
        pq.write_table(pa.Table.from_pylist(rows[half:]), f)


def test_run_reads_and_writes_s3(s3_server, ray_cluster):
    _upload_corpus(s3_server, "run1", bbc_sample(16, seed=2))
    result = run(parse_config(_config("run1")))
    fs = s3_server.filesystem()
    assert fs.get_file_info(f"{BUCKET}/run1/out/_SUCCESS").type == pafs.FileType.File
    ledger = pq.read_table(f"{BUCKET}/run1/out/ledger", filesystem=fs)
    assert ledger.num_rows == 17
    assert ledger.column("status").to_pylist().count("quarantined") == 1
    selected = pq.read_table(f"{BUCKET}/run1/out/selected", filesystem=fs)
    assert selected.num_rows == 5 and {"text", "topic", "loss", "cluster"} <= set(selected.column_names)
    assert result.manifest["reuse"]["scores"]["uri"].startswith("s3://")
    # nothing of the staging area is left behind
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/run1/out"))]
    assert sorted(names) == ["_SUCCESS", "ledger", "manifest.json", "selected"]


def test_retries_ride_out_a_store_that_refuses_for_a_few_seconds(s3_server):
    s3_server.stop()
    restart = threading.Timer(3.0, s3_server.start)
    restart.start()
    start = time.monotonic()
    rfs.write_text(f"s3://{BUCKET}/refused/marker.txt", "written after the outage")
    restart.join()
    assert time.monotonic() - start >= 2.5
    assert rfs.read_text(f"s3://{BUCKET}/refused/marker.txt") == "written after the outage"


def test_outage_during_a_run_completes_or_fails_clearly_without_success(s3_server, ray_cluster, tmp_path):
    _upload_corpus(s3_server, "run2", bbc_sample(16, seed=3))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(_config("run2")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    fs = s3_server.filesystem()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # wait until the run is writing to S3
        if fs.get_file_info(pafs.FileSelector(f"{BUCKET}/run2/work", allow_not_found=True, recursive=True)):
            break
        time.sleep(0.2)
    s3_server.stop()
    time.sleep(4)
    s3_server.start()
    out, _ = proc.communicate(timeout=600)
    committed = fs.get_file_info(f"{BUCKET}/run2/out/_SUCCESS").type == pafs.FileType.File
    if proc.returncode == 0:
        assert committed
        assert pq.read_table(f"{BUCKET}/run2/out/ledger", filesystem=fs).num_rows == 17
    else:
        assert not committed, out[-3000:]
        assert "error:" in out, out[-3000:]


def test_compressed_input_is_listed_and_streamed_from_s3(s3_server):
    fs = s3_server.filesystem()
    lines = [json.dumps({"id": f"r{i}", "text": f"row {i} " + "word " * 10}).encode() + b"\n" for i in range(20_000)]
    body, ten = b"".join(lines), b"".join(lines[:10])
    with fs.open_output_stream(f"{BUCKET}/packed/corpus/a.jsonl.gz", compression="gzip") as f:
        f.write(ten)
    with fs.open_output_stream(f"{BUCKET}/packed/corpus/sub/b.JSONL.ZST", compression="zstd") as f:
        f.write(ten)
    cut = bz2.compress(body)  # two 900 kB blocks; a cut inside the second keeps the rows of the first
    with fs.open_output_stream(f"{BUCKET}/packed/corpus/c.ndjson.bz2", compression=None) as f:
        f.write(cut[: len(cut) * 9 // 10])
    with fs.open_output_stream(f"{BUCKET}/packed/corpus/notes.txt") as f:
        f.write(b"not a corpus file")
    cfg = InputConfig(path=f"s3://{BUCKET}/packed/corpus", id_field="id")
    files = list_input(cfg)
    assert [f.rel for f in files] == ["a.jsonl.gz", "c.ndjson.bz2", "sub/b.JSONL.ZST"] and files.skipped == (
        "notes.txt",
    )
    check_input(files, cfg)
    batches = list(
        CorpusReader(cfg)({"uri": np.array([f.uri for f in files]), "rel": np.array([f.rel for f in files])})
    )
    out = {k: np.concatenate([b[k] for b in batches]).tolist() for k in batches[0]}
    rows = list(zip(out["source"], out["row"], out["reason"], strict=True))
    assert rows[:10] == [("a.jsonl.gz", i, "") for i in range(10)]
    assert rows[-10:] == [("sub/b.JSONL.ZST", i, "") for i in range(10)]
    broken = [r for r in rows if r[0] == "c.ndjson.bz2"]
    assert broken[-1][1] == -1 and broken[-1][2].startswith(f"compressed stream broken after line {len(broken) - 1}: ")
    assert 0 < len(broken) - 1 < 20_000 and [r[1] for r in broken[:-1]] == list(range(len(broken) - 1))
    # globs follow one level per `*`, any depth for `**`; a missing folder is named
    assert [f.rel for f in list_input(InputConfig(path=f"s3://{BUCKET}/packed/corpus/*.gz"))] == ["a.jsonl.gz"]
    assert [f.rel for f in list_input(InputConfig(path=f"s3://{BUCKET}/packed/**/*.ZST"))] == [
        "corpus/sub/b.JSONL.ZST"
    ]
    with pytest.raises(InputError, match=r"folder 's3://raysel-test/packed/nope' does not exist"):
        list_input(InputConfig(path=f"s3://{BUCKET}/packed/nope/*.jsonl"))
    with pytest.raises(InputError, match=r"does not exist$"):
        list_input(InputConfig(path=f"s3://{BUCKET}/packed/nope.jsonl"))

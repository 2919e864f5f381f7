"""Input, work dir and output on a real S3 server (SeaweedFS on loopback)."""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysel.config import parse_config
from raysel.io import fs as rfs
from raysel.pipeline import run
from tests.conftest import bbc_sample

BUCKET = "raysel-test"


def _config(prefix: str, **select) -> dict:
    return {
        "input": {"path": f"s3://{BUCKET}/{prefix}/corpus", "id_field": "id", "label_field": "topic"},
        "output": {"path": f"s3://{BUCKET}/{prefix}/out"},
        "embed": {"batch_size": 16, "max_tokens": 32},
        "scorers": [{"name": "loss", "max_tokens": 12, "batch_size": 8}],
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

"""Kill the driver in the middle of pass 1, then `--resume`: committed shards are not recomputed."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from tests.conftest import bbc_sample, tiny_lm, write_jsonl

FILES, ROWS_PER_FILE = 6, 16


def _config(root, out, work):
    return (
        f"input: {{path: {root / 'corpus'}, id_field: id}}\n"
        f"output: {{path: {out}}}\n"
        "embed: {batch_size: 8, max_tokens: 16}\n"
        f"scorers: [{{name: entropy, model: {tiny_lm()}, max_tokens: 16, batch_size: 8}}]\n"
        "cluster: {k: 3}\n"
        "select: {budget: 0.3, policy: stratified, score: entropy, seed: 0}\n"
        f"work_dir: {work}\n"
        "shard_rows: 16\n"  # several shards from a small corpus, so the run can be cut between them
    )


def _raysel(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
        start_new_session=True,
        **kw,
    )


def _shards(work):
    return [p for p in work.rglob("scores/*.parquet")]


def test_killed_driver_resumes_without_recomputing(tmp_path, ray_cluster):
    rows = bbc_sample(FILES * ROWS_PER_FILE, seed=11, max_chars=200)
    for i in range(FILES):
        write_jsonl(tmp_path / "corpus" / f"part-{i}.jsonl", rows[i * ROWS_PER_FILE : (i + 1) * ROWS_PER_FILE])
    config = tmp_path / "run.yaml"
    config.write_text(_config(tmp_path, tmp_path / "out", tmp_path / "work"))

    proc = _raysel("run", config)
    deadline = time.monotonic() + 600
    while len(_shards(tmp_path / "work")) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted:\n" + proc.stdout.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, as a preempted node would lose it
    proc.wait()
    committed_before = sum(pq.ParquetFile(p).metadata.num_rows for p in _shards(tmp_path / "work"))
    assert 0 < committed_before < FILES * ROWS_PER_FILE
    assert not (tmp_path / "out" / "_SUCCESS").exists() and (tmp_path / "out" / "_run.json").exists()

    refused = _raysel("run", config)
    assert refused.wait(300) == 2 and "--resume" in refused.stdout.read()

    resumed = _raysel("run", config, "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    scores = manifest["reuse"]["scores"]
    assert scores["resumed_rows"] >= committed_before
    assert scores["resumed_rows"] + scores["scored_rows"] == FILES * ROWS_PER_FILE  # each row scored once
    ledger = pq.read_table(tmp_path / "out" / "ledger")
    assert ledger.num_rows == FILES * ROWS_PER_FILE and len(set(ledger.column("id").to_pylist())) == ledger.num_rows

    # The same config, uninterrupted, into a fresh work dir: the same selection.
    clean = tmp_path / "clean.yaml"
    clean.write_text(_config(tmp_path, tmp_path / "out-clean", tmp_path / "work-clean"))
    fresh = _raysel("run", clean)
    assert fresh.wait(600) == 0, fresh.stdout.read()[-3000:]
    ids = lambda out: sorted(pq.read_table(out / "selected").column("id").to_pylist())  # noqa: E731
    assert ids(tmp_path / "out") == ids(tmp_path / "out-clean")

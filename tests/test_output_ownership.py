"""Who owns an output folder, and what --overwrite does: the lock and the commit swap of io/sink.py, on a
local disk and on the real S3 server, with real `raysel run` processes racing for one folder."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raysel.errors import SinkError
from raysel.io import sink as sink_module
from raysel.io.sink import OutputSink
from tests.conftest import bbc_sample, tiny_lm, write_jsonl

BUCKET = "raysel-test"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    lock = {"run_id": "elsewhere", "host": socket.gethostname(), "pid": os.getpid(), "started_unix": now}
    (folder / "_lock.json").write_text(json.dumps({**lock, "heartbeat_unix": now, **fields}))


# --- the lock -------------------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_live_owner(tmp_path):
    first = OutputSink(str(tmp_path / "out"))
    first.prepare("digest")
    second = OutputSink(str(tmp_path / "out"), overwrite=True)
    with pytest.raises(SinkError, match=f"in use by run {first.run_id} \\(pid {os.getpid()} on "):
        second.prepare("digest")
    assert first.owns()  # the refused run left the owner's lock alone
    first.release()
    assert not (tmp_path / "out" / "_lock.json").exists()
    second.prepare("digest")  # free again: the interrupted state is overwritable
    assert second.owns()
    second.release()


def _claim(folder: str, ready, tried, results) -> None:
    sink = OutputSink(folder)
    ready.wait(60)  # every process started and imported: they claim at once
    try:
        sink.claim()
        results.put(sink.run_id)
    except SinkError:
        results.put(None)
    tried.wait(60)  # the winner holds the folder until every other claim has been tried
    sink.release()


def test_of_runs_claiming_at_once_exactly_one_gets_the_folder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results, ready, tried = ctx.Queue(), ctx.Barrier(6), ctx.Barrier(6)
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "out"), ready, tried, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    winners = [r for r in (results.get(timeout=5) for _ in procs) if r is not None]
    assert len(winners) == 1


def test_a_lock_whose_process_died_is_taken_over(tmp_path):
    _write_lock(tmp_path / "out", pid=_dead_pid())
    sink = OutputSink(str(tmp_path / "out"), overwrite=True)
    sink.prepare("digest")
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["run_id"] == sink.run_id
    sink.release()


def test_a_lock_on_another_host_is_live_until_its_heartbeat_is_stale(tmp_path):
    _write_lock(tmp_path / "out", host="another-host", pid=1)
    with pytest.raises(SinkError, match="in use by run elsewhere .*on another-host"):
        OutputSink(str(tmp_path / "out")).prepare("digest")
    stale = time.time() - sink_module.STALE_AFTER_S - 60
    _write_lock(tmp_path / "out", host="another-host", pid=1, heartbeat_unix=stale)
    sink = OutputSink(str(tmp_path / "out"))
    sink.prepare("digest")
    assert sink.owns()
    sink.release()


def test_the_heartbeat_keeps_the_lock_fresh_and_notices_a_lost_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(sink_module, "HEARTBEAT_S", 0.2)
    sink = OutputSink(str(tmp_path / "out"))
    sink.prepare("digest")
    first = json.loads((tmp_path / "out" / "_lock.json").read_text())["heartbeat_unix"]
    time.sleep(0.8)
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["heartbeat_unix"] > first
    _write_lock(tmp_path / "out", run_id="thief")  # another run took the folder over (it judged us stale)
    time.sleep(0.8)
    assert "thief" in sink.lost
    with pytest.raises(SinkError, match="no longer owns it; it is held by run thief"):
        sink.commit({})
    sink.release()
    assert json.loads((tmp_path / "out" / "_lock.json").read_text())["run_id"] == "thief"  # not ours to remove


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SinkError, match="is a file, not a folder"):
        OutputSink(str(tmp_path / "out")).prepare("digest")


# --- overwrite keeps the old result until the new one commits ------------------------------------------------


def _committed(folder: Path, marker: str) -> None:
    sink = OutputSink(str(folder), overwrite=True)
    sink.prepare("digest")
    for name in ("ledger", "selected"):
        staged = Path(sink.staging) / name
        staged.mkdir(parents=True)
        (staged / "part-0.parquet").write_text(marker)
    sink.commit({"marker": marker})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_overwrite_leaves_the_old_result_as_it_was(tmp_path):
    _committed(tmp_path / "out", "old")
    before = _snapshot(tmp_path / "out")
    sink = OutputSink(str(tmp_path / "out"), overwrite=True)
    sink.prepare("digest")
    (Path(sink.staging) / "ledger").mkdir(parents=True)
    assert _snapshot(tmp_path / "out") == {**before, **_snapshot(tmp_path / "out")}  # old files all still there
    assert (tmp_path / "out" / "_SUCCESS").exists() and (tmp_path / "out" / "ledger" / "part-0.parquet").exists()
    sink.abandon()  # the new run failed
    assert _snapshot(tmp_path / "out") == before


def test_an_overwrite_replaces_every_file_raysel_owns_at_commit(tmp_path):
    _committed(tmp_path / "out", "old")
    (tmp_path / "out" / "report.html").write_text("the old run's report")
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    _committed(tmp_path / "out", "new")
    files = _snapshot(tmp_path / "out")
    assert files.pop("notes.txt") == b"the user's own file"  # not raysel's: kept
    assert files == {
        "_SUCCESS": b"",
        "ledger/part-0.parquet": b"new",
        "manifest.json": json.dumps({"marker": "new"}, indent=2).encode(),
        "selected/part-0.parquet": b"new",
    }


# --- on the S3 server -----------------------------------------------------------------------------------------


def test_s3_claim_refuses_a_second_run_and_takes_over_a_dead_one(s3_server):
    uri = f"s3://{BUCKET}/ownership/out"
    first = OutputSink(uri)
    first.prepare("digest")
    with pytest.raises(SinkError, match=f"in use by run {first.run_id}"):
        OutputSink(uri, overwrite=True).prepare("digest")
    first.release()
    fs = s3_server.filesystem()
    assert fs.get_file_info(f"{BUCKET}/ownership/out/_lock.json").type == pafs.FileType.NotFound
    now = time.time()
    dead = {"run_id": "dead", "host": socket.gethostname(), "pid": _dead_pid(), "started_unix": now}
    with fs.open_output_stream(f"{BUCKET}/ownership/out/_lock.json") as f:
        f.write(json.dumps({**dead, "heartbeat_unix": now}).encode())
    taker = OutputSink(uri, overwrite=True)
    taker.prepare("digest")
    assert taker.owns()
    taker.release()


# --- real `raysel run` processes racing for one folder ------------------------------------------------------


def _config(root: Path, name: str, out: str, work: Path) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(
        f"input: {{path: {root / 'corpus.jsonl'}, id_field: id}}\n"
        f"output: {{path: '{out}'}}\n"
        "embed: {batch_size: 8, max_tokens: 16}\n"
        f"scorers: [{{name: entropy, model: {tiny_lm()}, max_tokens: 16, batch_size: 8}}]\n"
        "cluster: {k: 2}\n"
        "select: {budget: 0.5, policy: stratified, score: entropy, seed: 0}\n"
        f"work_dir: {work}\n"
    )
    return path


def _start(config: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raysel.cli", "run", str(config), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def _wait_for_lock(exists, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and exists(), "the first run did not claim the folder:\n" + proc.stdout.read()[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ownership")
    write_jsonl(root / "corpus.jsonl", bbc_sample(40, seed=8, max_chars=200))
    return root


def test_two_runs_one_folder_kill_the_owner_and_take_its_stale_lock_over(corpus, ray_cluster):
    out = corpus / "out"
    first = _start(_config(corpus, "first", str(out), corpus / "work-0"))
    assert first.wait(600) == 0, first.stdout.read()[-3000:]
    committed = _snapshot(out)

    # A long overwrite (fresh work dir: pass 1 from scratch) owns the folder; a second run is refused.
    owner = _start(_config(corpus, "owner", str(out), corpus / "work-1"), "--overwrite")
    _wait_for_lock((out / "_lock.json").exists, owner)
    owner_id = json.loads((out / "_lock.json").read_text())["run_id"]
    racer = _start(_config(corpus, "racer", str(out), corpus / "work-0"), "--overwrite")
    said, _ = racer.communicate(timeout=300)
    assert racer.returncode == 2, said[-3000:]
    assert f"is in use by run {owner_id} (pid {owner.pid} on" in said and "Traceback" not in said

    # The owner is killed mid-run: the committed result is exactly as it was.
    os.killpg(owner.pid, signal.SIGKILL)
    owner.wait()
    after_kill = _snapshot(out)
    assert {k: v for k, v in after_kill.items() if not k.startswith(("_lock", "_run", "_staging"))} == committed

    # Its lock is stale (dead pid): a new overwrite takes it over and commits; the output says so.
    again = _start(_config(corpus, "again", str(out), corpus / "work-0"), "--overwrite")
    said, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and f"committed: {out}" in said, said[-3000:]
    assert "taking over" in said and owner_id in said
    names = {p.name for p in out.iterdir()}
    assert names == {"_SUCCESS", "ledger", "manifest.json", "selected", "report.html"}


def test_two_runs_one_s3_folder(corpus, s3_server, ray_cluster):
    out = f"s3://{BUCKET}/ownership-e2e/out"
    fs = s3_server.filesystem()
    lock = f"{BUCKET}/ownership-e2e/out/_lock.json"
    owner = _start(_config(corpus, "s3-owner", out, corpus / "work-s3"))
    _wait_for_lock(lambda: fs.get_file_info(lock).type == pafs.FileType.File, owner)
    racer = _start(_config(corpus, "s3-racer", out, corpus / "work-0"), "--overwrite")
    said, _ = racer.communicate(timeout=300)
    assert racer.returncode == 2 and "is in use by run" in said, said[-3000:]
    said, _ = owner.communicate(timeout=600)
    assert owner.returncode == 0 and f"committed: {out}" in said, said[-3000:]
    assert fs.get_file_info(lock).type == pafs.FileType.NotFound

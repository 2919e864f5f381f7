"""The output folder of a run: who owns it, and how a result is committed.

    OUT/ledger/part-*.parquet     one row per input row: id, status, reason, provenance, scores, cluster
    OUT/selected/*.parquet        the selected rows: every input column, plus id, scores, cluster
    OUT/manifest.json             resolved config, counts per status, versions, seconds per pass
    OUT/_SUCCESS                  written last: a folder without it holds no result

**Ownership.** A run owns its output folder for its whole life through OUT/_lock.json (run id, host,
pid, heartbeat), created exclusively: on a local disk with O_CREAT|O_EXCL, so of two runs started at
once exactly one gets it. A second run is refused with a message that names the owner. The owner
rewrites its heartbeat every HEARTBEAT_S seconds; a lock whose pid is dead (same host) or whose
heartbeat is older than STALE_AFTER_S is stale and is taken over, by an atomic rename of the stale
file, so of two runs taking over at once one wins. S3 has no create-exclusive in pyarrow: there the
claim is a write followed by a read-back after a pause (CLAIM_SETTLE_S), which catches a race unless
two claims land within that pause of each other; this is the documented limit of object stores.
Before it commits, a run checks that the lock is still its own; a run that lost it does not commit.

**States.** While a run works, its files go under OUT/_staging-<run id>/ and OUT/_run.json records
which run staged there and with what config. A folder is in one of three states: empty, interrupted
(_run.json, no _SUCCESS) or committed (_SUCCESS).

**Overwrite.** `--overwrite` keeps the committed result untouched while the new run works; only at
commit, once the new result is staged and its counts verified, are the old files removed (_SUCCESS
first, so that no reader sees a mix) and the new ones moved into place. A failed or interrupted
overwrite leaves the old result as it was.

raysel only ever deletes what it owns there: ledger/, selected/, manifest.json, report.html,
_SUCCESS, _run.json, _lock.json and _staging-*/.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysel.errors import SinkError
from raysel.io import fs as rfs

log = logging.getLogger(__name__)

LEDGER_ROWS_PER_FILE = 1_000_000
# The owner rewrites its lock this often; a lock not rewritten for STALE_AFTER_S is taken to be dead.
HEARTBEAT_S = float(os.environ.get("RAYSEL_LOCK_HEARTBEAT_S", 30))
STALE_AFTER_S = float(os.environ.get("RAYSEL_LOCK_STALE_AFTER_S", 300))
CLAIM_SETTLE_S = 2.0
LOCK = "_lock.json"
RUN = "_run.json"
_RESULT_FILES = ("_SUCCESS", "manifest.json", "report.html")
_OWNED_DIRS = ("ledger", "selected")


def is_committed(uri: str) -> bool:
    """True when `uri` holds a complete run (its _SUCCESS exists)."""
    return rfs.exists(rfs.join(uri, "_SUCCESS"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def lock_is_stale(lock: dict[str, Any], now: float | None = None) -> str:
    """Why the lock's owner is taken to be gone ("" while it may be alive)."""
    now = time.time() if now is None else now
    if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int) and not _pid_alive(lock["pid"]):
        return f"its process {lock['pid']} on this host has exited"
    age = now - float(lock.get("heartbeat_unix", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
    return ""


def describe_owner(lock: dict[str, Any]) -> str:
    age = time.time() - float(lock.get("heartbeat_unix", 0))
    return (
        f"run {lock.get('run_id')} (pid {lock.get('pid')} on {lock.get('host')}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(lock.get('started_unix', 0)))}, "
        f"last heartbeat {age:.0f} s ago)"
    )


class OutputSink:
    """Claims an output folder, stages a run's output and commits it atomically (see the module docstring).

    Args:
        uri: the output folder, local or s3://.
        overwrite: replace a committed (or interrupted) run in that folder, once the new one commits.
        resume: continue an interrupted run in that folder (its config must be the same).
    """

    def __init__(self, uri: str, *, overwrite: bool = False, resume: bool = False) -> None:
        self.uri = uri
        self.overwrite = overwrite
        self.resume = resume
        self.run_id = uuid.uuid4().hex[:12]
        self.staging = rfs.join(uri, f"_staging-{self.run_id}")
        self._lock_uri = rfs.join(uri, LOCK)
        self._lock: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost = ""  # why this run no longer owns the folder ("" while it does)

    # --- ownership -------------------------------------------------------------------------------------------
    def prepare(self, config_digest: str) -> None:
        """Claim the folder for this run, then check its state against --overwrite / --resume.

        Raises SinkError, naming the live owner, when another run holds the folder."""
        self._check_is_folder()
        self.claim()
        try:
            self._check_state(config_digest)
            self._clear_dead_staging()
            rfs.write_text(rfs.join(self.uri, RUN), json.dumps({"run_id": self.run_id, "config": config_digest}))
        except BaseException:
            self.release()
            raise

    def _check_is_folder(self) -> None:
        fs, path = rfs.resolve(self.uri)
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise SinkError(f"output.path {self.uri!r} is a file, not a folder; choose a folder for the output")

    def claim(self) -> None:
        """Take OUT/_lock.json for this run, atomically, taking over a stale one; start the heartbeat."""
        now = time.time()
        self._lock = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_unix": round(now, 3),
            "heartbeat_unix": round(now, 3),
        }
        for _ in range(3):  # a takeover raced by another run: look again
            if self._create_exclusive():
                break
            current = self.read_lock()
            if current is None:
                continue  # released between our create and our read
            why = lock_is_stale(current)
            if not why:
                raise SinkError(
                    f"{self.uri} is in use by {describe_owner(current)}; wait for it to finish, stop it, "
                    "or choose another output.path"
                )
            log.warning("raysel: taking over %s from %s: %s", self.uri, describe_owner(current), why)
            self._remove_stale(current)
        else:
            raise SinkError(f"{self.uri}: could not claim the output folder (another run keeps claiming it)")
        self._heartbeat = threading.Thread(target=self._beat, name="raysel-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _create_exclusive(self) -> bool:
        fs, path = rfs.resolve(self._lock_uri)
        body = json.dumps(self._lock).encode()
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        # Object store: no create-exclusive through pyarrow. Write if absent, then read back after a pause:
        # of two claims more than CLAIM_SETTLE_S apart, the later one sees the earlier one's lock.
        if self.read_lock() is not None:
            return False
        rfs.write_text(self._lock_uri, body.decode())
        time.sleep(CLAIM_SETTLE_S)
        current = self.read_lock()
        return current is not None and current.get("run_id") == self.run_id

    def _remove_stale(self, stale: dict[str, Any]) -> None:
        fs, path = rfs.resolve(self._lock_uri)
        if isinstance(fs, pafs.LocalFileSystem):
            # A rename succeeds for exactly one of several runs taking over the same stale lock.
            try:
                os.rename(path, f"{path}.stale-{self.run_id}")
            except FileNotFoundError:
                return
            os.unlink(f"{path}.stale-{self.run_id}")
            return
        current = self.read_lock()
        if current is not None and current.get("run_id") == stale.get("run_id"):
            fs.delete_file(path)

    def read_lock(self) -> dict[str, Any] | None:
        """The lock's content, or None when the folder is not claimed."""
        try:
            return json.loads(rfs.read_text(self._lock_uri))
        except FileNotFoundError:
            return None
        except ValueError:
            # Half-written by a claim in progress, or damaged: treat it as held now, stale after its mtime ages.
            fs, path = rfs.resolve(self._lock_uri)
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                return None
            mtime = info.mtime.timestamp() if info.mtime else 0.0
            return {"run_id": "?", "host": "?", "pid": None, "started_unix": mtime, "heartbeat_unix": mtime}

    def owns(self) -> bool:
        current = self.read_lock()
        return current is not None and self._lock is not None and current.get("run_id") == self.run_id

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = self.read_lock()
                if current is not None and current.get("run_id") == "?":  # half-written: read the new owner whole
                    time.sleep(0.2)
                    current = self.read_lock()
                if current is None or current.get("run_id") != self.run_id:
                    owner = "nobody" if current is None else describe_owner(current)
                    self.lost = f"the output folder's lock is now held by {owner}"
                    log.error("raysel: %s lost %s: %s", self.run_id, self.uri, self.lost)
                    return
                self._lock["heartbeat_unix"] = round(time.time(), 3)
                self._rewrite_lock()
            except OSError as err:  # a store that refuses for a while: try again at the next beat
                log.warning("raysel: heartbeat on %s failed: %s", self._lock_uri, err)

    def _rewrite_lock(self) -> None:
        """Rewrite this run's lock in place; on a local disk by a rename, so a reader never sees half a file."""
        fs, path = rfs.resolve(self._lock_uri)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.{self.run_id}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._lock, f)
            os.replace(tmp, path)
        else:
            rfs.write_text(self._lock_uri, json.dumps(self._lock))

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's. Safe to call twice."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self._lock is not None and self.owns():
            fs, path = rfs.resolve(self._lock_uri)
            fs.delete_file(path)
        self._lock = None

    def abandon(self) -> None:
        """After a failure: drop this run's staging folder and its lock; a committed result stays as it was
        (and so does the record of an interrupted run, which --resume continues)."""
        if self._lock is not None and self.owns():
            rfs.delete_dir(self.staging)
            if is_committed(self.uri):
                fs, path = rfs.resolve(rfs.join(self.uri, RUN))
                if fs.get_file_info(path).type == pafs.FileType.File:
                    fs.delete_file(path)
        self.release()

    # --- state ---------------------------------------------------------------------------------------------
    def _check_state(self, config_digest: str) -> None:
        run_file = rfs.join(self.uri, RUN)
        if is_committed(self.uri):
            if not self.overwrite:
                raise SinkError(
                    f"{self.uri} already holds a committed run (_SUCCESS exists); pass --overwrite to replace it "
                    "(the old result stays until the new one commits), or choose another output.path"
                )
        elif rfs.exists(run_file):
            try:
                previous = json.loads(rfs.read_text(run_file))
            except ValueError:
                previous = {}
            if self.resume and previous.get("config") != config_digest:
                raise SinkError(
                    f"{self.uri} holds an interrupted run with a different config; --overwrite to start over"
                )
            if not (self.resume or self.overwrite):
                raise SinkError(
                    f"{self.uri} holds an interrupted run (no _SUCCESS); pass --resume to continue it "
                    "(scores already computed are reused) or --overwrite to start over"
                )

    def _clear_dead_staging(self) -> None:
        """Staging folders of runs that died: this run holds the lock, so none of them is alive."""
        fs, path = rfs.resolve(self.uri)
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("_staging-"):
                fs.delete_dir(info.path)

    # --- writing -------------------------------------------------------------------------------------------
    @property
    def ledger_uri(self) -> str:
        """Where the ledger is staged: written here from the driver (`write_ledger`) or by the workers."""
        return rfs.join(self.staging, "ledger")

    def write_ledger(self, table: pa.Table) -> None:
        fs, path = rfs.resolve(self.ledger_uri)
        fs.create_dir(path, recursive=True)
        for part, start in enumerate(range(0, max(table.num_rows, 1), LEDGER_ROWS_PER_FILE)):
            with fs.open_output_stream(f"{path}/part-{part:05d}.parquet") as out:
                pq.write_table(table.slice(start, LEDGER_ROWS_PER_FILE), out)

    @property
    def selected_uri(self) -> str:
        """Where the selected shards are staged (io/selected.py writes them)."""
        return rfs.join(self.staging, "selected")

    def write_selected_index(self, index: dict[str, Any], *, expected_rows: int) -> int:
        """Check the staged shards against `index` and the selection, then write selected/_index.json.

        Raises SinkError, so that nothing is committed, when a shard is missing, has another size, or the rows
        differ from the rows chosen (counted from the Parquet footers where the format is Parquet)."""
        fs, path = rfs.resolve(self.selected_uri)
        fs.create_dir(path, recursive=True)
        for shard in index["shards"]:
            info = fs.get_file_info(f"{path}/{shard['name']}")
            if info.type != pafs.FileType.File or info.size != shard["bytes"]:
                raise SinkError(f"selected shard {shard['name']} is missing or not as written; not committing")
        written = rfs.parquet_rows(self.selected_uri) if index["format"] == "parquet" else index["rows"]
        if written != expected_rows or index["rows"] != expected_rows:
            raise SinkError(f"wrote {written} selected rows where {expected_rows} were chosen; not committing")
        rfs.write_text(rfs.join(self.selected_uri, "_index.json"), json.dumps(index, indent=2))
        return written

    def commit(self, manifest: dict[str, Any]) -> None:
        """Swap the staged result in: the old result's files go (_SUCCESS first), the staged folders move into
        place, then manifest.json, then _SUCCESS; then the lock is released.

        Raises SinkError, committing nothing, when this run no longer owns the folder."""
        if self.lost or not self.owns():
            owner = self.read_lock()
            raise SinkError(
                f"not committing to {self.uri}: this run ({self.run_id}) no longer owns it"
                + (f"; it is held by {describe_owner(owner)}" if owner else "")
            )
        for name in _RESULT_FILES:
            fs, path = rfs.resolve(rfs.join(self.uri, name))
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)
        for name in _OWNED_DIRS:
            rfs.delete_dir(rfs.join(self.uri, name))
            rfs.move_dir(rfs.join(self.staging, name), rfs.join(self.uri, name))
        rfs.delete_dir(self.staging)
        rfs.write_text(rfs.join(self.uri, "manifest.json"), json.dumps(manifest, indent=2, default=str))
        rfs.write_text(rfs.join(self.uri, "_SUCCESS"), "")
        fs, path = rfs.resolve(rfs.join(self.uri, RUN))
        fs.delete_file(path)
        self.release()

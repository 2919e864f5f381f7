"""The one place a stage config becomes Ray scheduling: actor pools, CPU/GPU reservations, batch sizes."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from raysel.config import StageConfig

logger = logging.getLogger(__name__)

# Read, split, assign and write tasks reserve this much CPU each: a pool that reserves every CPU
# would leave them none, and the pipeline would hang at its start with no error. Pass 1 runs a read,
# a block split and a shard write beside its pools at once.
IO_TASK_CPUS = 0.25
IO_HEADROOM = 3 * IO_TASK_CPUS

# Each actor call gets this many forward-pass batches, so sorting by length inside a call cuts padding.
BATCHES_PER_CALL = 4


# A lost node restarts the actors it held elsewhere, and the calls in flight are retried while the actor is
# unreachable (until it is back, or dead for good): more losses than this in one run fail it. For actors whose
# calls may run twice (scoring is idempotent; the bandit's `record` is tagged with its round).
RESTARTABLE_ACTOR = {"max_restarts": 3, "max_task_retries": -1}

# Nothing waits forever: an actor pool that cannot start (e.g. no node has the GPUs it asks for) fails after
# this long, and so does a pipeline that makes no progress. Read once, here; override through the environment.
ACTOR_START_TIMEOUT_S = float(os.environ.get("RAYSEL_ACTOR_START_TIMEOUT_S", 600))
NO_PROGRESS_TIMEOUT_S = float(os.environ.get("RAYSEL_NO_PROGRESS_TIMEOUT_S", 1800))
# Ray Data merges a stage's output batches into blocks of up to 128 MiB; text rows with an embedding are
# ~2 KiB, so that would hand the next stage (and the shard writer) tens of thousands of rows at once. Small
# blocks keep the stream moving: the LM stage starts after the embedder's first few batches, progress bars
# move block by block, and an interrupted pass 1 loses at most a block of work.
TARGET_BLOCK_BYTES = int(os.environ.get("RAYSEL_TARGET_BLOCK_BYTES", 1 << 20))


def init_ray(address: str | None, *, include_dashboard: bool | None = None) -> bool:
    """Connect this process to Ray and set raysel's Ray Data limits. Returns True when it started a local cluster.

    Joins only the cluster it is told about: `address`, else RAY_ADDRESS ("host:port", "ray://...", or "auto"
    for the cluster `ray start` started on this machine). With neither, it starts a new local cluster for this
    process (`ray.init(address="local")`) rather than `ray.init(address=None)`, which would silently join a
    `ray start` cluster on the machine. A cluster it started is ended whole on every exit it can observe
    (return, exception, SIGINT, SIGTERM, SIGHUP: `end_local_cluster`), and what a killed predecessor left of
    its cluster is ended before the start (`reap_local_clusters`).

    Args:
        address: the cluster to join; None: RAY_ADDRESS, else a new local cluster.
        include_dashboard: for a local cluster, whether to start Ray's dashboard (None: Ray's default).
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        end_local_cluster()  # a cluster this process started and someone shut down: sweep what is left of it
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        opts = {"ignore_reinit_error": True, "log_to_driver": True, "logging_level": "WARNING"}
        if target != "local":
            ray.init(address=target, **opts)
        else:
            reap_local_clusters()
            _say_ray_start_cluster_is_not_joined()
            ray.init(address="local", include_dashboard=include_dashboard, **opts)
            _own_local_cluster()
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ctx.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    ctx.target_max_block_size = TARGET_BLOCK_BYTES
    return _OWN_CLUSTER is not None


# The local cluster this process started (its record, as written to the registry), or None. One per process.
_OWN_CLUSTER: dict[str, Any] | None = None
# SIGTERM and SIGHUP end the process through SystemExit, so atexit runs and ends the cluster; SIGINT already
# raises KeyboardInterrupt. A killed (SIGKILL) driver leaves Ray's dashboard and runtime-env agents running (the
# reaper process ray.init spawns ends only the GCS, raylet and dashboard): the next start ends them, from the registry.
_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_GRACE_S = 3.0


def local_cluster_registry() -> Path:
    """Where raysel records the local clusters it starts: one JSON file each (driver pid, Ray session dir)."""
    from raysel.config import cache_dir

    return cache_dir() / "local-ray"


def end_local_cluster() -> None:
    """End the local cluster this process started, all of it, and forget it; nothing when it started none.

    `ray.shutdown()` ends the processes the driver started (GCS, raylet, dashboard, ...); the session's
    processes still alive after it (agents, workers) are then ended by their session dir. On a cluster this
    process joined, it does nothing: that cluster is not raysel's to stop.
    """
    global _OWN_CLUSTER
    record, _OWN_CLUSTER = _OWN_CLUSTER, None
    if record is None:
        return
    import ray

    try:
        ray.shutdown()
    except Exception as err:  # exiting anyway: what is left is ended below
        logger.warning("raysel: ray.shutdown() failed (%s); ending the local cluster's processes", err)
    _end_processes(_session_processes(record))
    Path(record["record"]).unlink(missing_ok=True)


def reap_local_clusters(registry: Path | None = None) -> list[int]:
    """End what is left of the local clusters that raysel processes started and that outlived their driver.

    A cluster is ended only when its record says raysel started it and the driver that started it is dead (a
    live driver's cluster, or any cluster raysel did not start, is never touched). Its processes are the live
    ones whose command line names the cluster's session dir, or, for Ray's processes that rename themselves
    (`ray::DashboardAgent`, `ray::IDLE`), whose open files lie in it.

    Args:
        registry: the folder of records; default `local_cluster_registry()`.

    Returns:
        The pids ended.
    """
    registry = registry or local_cluster_registry()
    ended: list[int] = []
    for path in sorted(registry.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            if _alive(record["driver_pid"], record["driver_started"]):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: leave it (records are written whole, by rename)
        procs = _session_processes(record)
        if procs:
            logger.warning(
                "raysel: ending %d process(es) left by the local Ray cluster of a killed raysel (pid %s, %s)",
                len(procs),
                record["driver_pid"],
                record["session_dir"],
            )
        ended += _end_processes(procs)
        path.unlink(missing_ok=True)
    return ended


def _own_local_cluster() -> None:
    """Record the local cluster just started (so a successor can end it if this process is killed) and end it
    on every exit this process can observe."""
    global _OWN_CLUSTER
    import atexit

    import ray

    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()  # no public API gives it
    except AttributeError:
        session_dir = None
    started = _create_time(os.getpid())
    if session_dir is None or started is None:
        logger.warning("raysel: cannot record the local Ray cluster; if this process is killed, it may outlive it")
        return
    registry = local_cluster_registry()
    path = registry / f"{Path(session_dir).name}.json"
    record = {
        "driver_pid": os.getpid(),
        "driver_started": started,
        "session_dir": session_dir,
        "session_realpath": os.path.realpath(session_dir),
        "record": str(path),
    }
    try:
        registry.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError as err:
        logger.warning("raysel: cannot record the local Ray cluster in %s (%s)", registry, err)
    _OWN_CLUSTER = record
    atexit.unregister(end_local_cluster)  # once, however many clusters this process starts in turn
    atexit.register(end_local_cluster)  # runs before Ray's own atexit shutdown (registered at import)
    if threading.current_thread() is threading.main_thread():
        for sig in _EXIT_SIGNALS:
            signal.signal(sig, _exit_on_signal)  # replaces ray.init's SIGTERM handler, which exits the same way


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _say_ray_start_cluster_is_not_joined() -> None:
    try:
        from ray._private.services import find_bootstrap_address

        recorded = find_bootstrap_address(None)
    except Exception:  # another Ray's internals: say nothing
        return
    if recorded:
        logger.warning(
            "raysel: starting a new local Ray cluster for this process, not joining the one `ray start` recorded "
            "on this machine (%s); to run there, pass --address %s (ray.address in a run config) or set "
            "RAY_ADDRESS=auto",
            recorded,
            recorded,
        )


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no such process, or no psutil
        return None


def _alive(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs (not a later process given the same pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _session_processes(record: dict[str, Any]) -> list[Any]:
    """The live processes of a recorded local cluster: those whose command line names its session dir, and
    Ray's renamed ones (`ray::...`) with a file open in it. Never this process."""
    try:
        import psutil
    except ImportError:
        logger.warning("raysel: psutil is missing: cannot end the processes of %s", record.get("session_dir"))
        return []
    dirs = {record["session_dir"], record.get("session_realpath") or record["session_dir"]}
    prefixes = tuple(d.rstrip(os.sep) + os.sep for d in dirs)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        cmdline = proc.info["cmdline"] or []
        try:
            if any(d in arg for arg in cmdline for d in dirs) or (
                cmdline
                and cmdline[0].startswith("ray::")
                and any(f.path.startswith(prefixes) for f in proc.open_files())
            ):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def _end_processes(procs: list[Any]) -> list[int]:
    """SIGTERM, then SIGKILL after _GRACE_S what is still alive (Ray's agents ignore SIGTERM without a raylet)."""
    if not procs:
        return []
    import psutil

    alive = list(procs)
    for send in ("terminate", "kill"):
        for proc in alive:
            try:
                getattr(proc, send)()
            except psutil.Error:
                pass
        deadline = time.monotonic() + _GRACE_S
        while (alive := [p for p in alive if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive:
            break
    return [p.pid for p in procs]


def _running(proc: Any) -> bool:
    """Alive and not a zombie (an ended process whose parent, often init in a container, has not reaped it)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def fit_cpus(stages: list[StageConfig], total_cpus: float) -> list[float]:
    """Per-actor CPU reservations, scaled down together when the pools would leave no room for I/O tasks.

    The pools are counted at their minimum size, the actors that must start before the stream flows. An elastic
    pool's further actors start only inside the CPUs Ray Data's resource manager gives the pool, which keeps a
    reservation for every other operator (the reads among them), so growing never starves the I/O tasks."""
    wanted = sum(s.pool_size[0] * s.resources.cpus for s in stages)
    room = max(total_cpus - IO_HEADROOM, 0.1 * len(stages))
    scale = min(1.0, room / wanted) if wanted else 1.0
    return [round(s.resources.cpus * scale, 3) for s in stages]


def call_rows(stage: StageConfig) -> int:
    """Rows in one call of a stage's actor: `BATCHES_PER_CALL` forward batches."""
    return stage.batch_size * BATCHES_PER_CALL


def map_stage(ds: Any, cls: type, stage: StageConfig, cpus: float, **constructor_kwargs: Any) -> Any:
    """`ds.map_batches(cls)` on an actor pool of the stage's size, fixed (`actors: N`) or elastic (`actors: {min: M,
    max: N}`: Ray Data adds actors while calls queue up and the cluster has room), reserving what the config says."""
    from ray.data import ActorPoolStrategy

    low, high = stage.pool_size
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=constructor_kwargs,
        compute=ActorPoolStrategy(min_size=low, max_size=high),
        batch_size=call_rows(stage),
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=stage.resources.gpus,
        zero_copy_batch=True,
    )


def map_stages(ds: Any, stages: list[tuple[type, StageConfig, dict[str, Any]]]) -> Any:
    """The model stages in order, each `(class, config, constructor kwargs)` on its own actor pool, their CPU
    reservations fitted to the cluster's CPUs.

    Blocks are cut to each stage's call size where they may be larger: after the read (blocks of up to
    TARGET_BLOCK_BYTES, any number of rows) and after a stage whose calls are longer than the next one's.
    """
    import ray

    cpus = fit_cpus([cfg for _, cfg, _ in stages], ray.cluster_resources().get("CPU", 1.0))
    block_rows = None
    for (cls, cfg, kwargs), stage_cpus in zip(stages, cpus, strict=True):
        if block_rows is None or call_rows(cfg) < block_rows:
            ds = split_blocks(ds, call_rows(cfg))
        ds = map_stage(ds, cls, cfg, stage_cpus, **kwargs)
        block_rows = call_rows(cfg)
    return ds


def split_blocks(ds: Any, rows: int) -> Any:
    """Cut `ds`'s blocks to at most `rows` rows, so that every actor of the next pool gets work.

    An actor-pool call takes whole blocks (`map_batches` bundles blocks up to its batch size and never
    splits one), so a 1 MiB block of 400 texts is 400 rows of work for one actor while its peers idle.
    This is `ds.repartition(target_num_rows_per_block=rows)`, except that it reserves IO_TASK_CPUS: the
    public call's tasks reserve a whole CPU, never start beside full actor pools, and the pass waits. Ray
    fuses it into the task before it (the read), so there it costs no task of its own.
    """
    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators.map_operator import StreamingRepartition

        op = StreamingRepartition(
            target_num_rows_per_block=rows,
            input_dependencies=[ds._logical_plan.dag],
            ray_remote_args={"num_cpus": IO_TASK_CPUS},
        )
        return type(ds)._from_parent(ds, LogicalPlan(op, ds.context))
    except (ImportError, TypeError, AttributeError) as err:  # another Ray's internals: keep its blocks
        logger.warning("raysel: blocks stay as Ray Data makes them (%s); small corpora may use one actor", err)
        return ds


SHARDS_PER_READ_TASK = 32


def read_shards(uri: str, columns: list[str] | None = None) -> Any:
    """A folder of Parquet shards as a dataset, read by IO_TASK_CPUS tasks of up to SHARDS_PER_READ_TASK files
    each (at least two tasks per CPU), in file order.

    Not `ray.data.read_parquet`: in Ray 2.60 it lists the files in a task that reserves a whole CPU, and on a
    small cluster whose actor pools hold the other CPUs that task never runs: the pass waits, silently.
    """
    import pyarrow.fs as pafs
    import ray

    from raysel.io import fs as rfs

    fs, path = rfs.resolve(uri)
    prefix = "s3://" if uri.startswith("s3://") else ""
    files = sorted(
        prefix + info.path
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.path.endswith(".parquet")
    )
    # A task per file costs ~0.1 s of scheduling each here, more than reading a 2,048-row shard: a pass over
    # 1M rows in 489 shards took 7 s, in 16 tasks 0.3 s. Enough tasks to keep every CPU reading, no more.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = min(len(files), max(2 * cpus, math.ceil(len(files) / SHARDS_PER_READ_TASK)))
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=max(1, tasks))
    return ds.map_batches(_read_shard, fn_kwargs={"columns": columns}, batch_size=1, num_cpus=IO_TASK_CPUS)


def _read_shard(batch: dict, columns: list[str] | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysel.io import fs as rfs

    for uri in batch["uri"]:
        fs, path = rfs.resolve(str(uri))
        for record_batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=4096, columns=columns):
            yield pa.Table.from_batches([record_batch])

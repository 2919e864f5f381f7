"""The one place a stage config becomes Ray scheduling: actor pools, CPU/GPU reservations, batch sizes."""

from __future__ import annotations

import logging
import os
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


def init_ray(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one; set raysel's Ray Data limits."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True, logging_level="WARNING")
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    ctx.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    ctx.target_max_block_size = TARGET_BLOCK_BYTES


def fit_cpus(stages: list[StageConfig], total_cpus: float) -> list[float]:
    """Per-actor CPU reservations, scaled down together when the pools would leave no room for I/O tasks."""
    wanted = sum(s.actors * s.resources.cpus for s in stages)
    room = max(total_cpus - IO_HEADROOM, 0.1 * len(stages))
    scale = min(1.0, room / wanted) if wanted else 1.0
    return [round(s.resources.cpus * scale, 3) for s in stages]


def call_rows(stage: StageConfig) -> int:
    """Rows in one call of a stage's actor: `BATCHES_PER_CALL` forward batches."""
    return stage.batch_size * BATCHES_PER_CALL


def map_stage(ds: Any, cls: type, stage: StageConfig, cpus: float, **constructor_kwargs: Any) -> Any:
    """`ds.map_batches(cls)` on a fixed-size actor pool, reserving what the stage config says."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        cls,
        fn_constructor_kwargs=constructor_kwargs,
        compute=ActorPoolStrategy(size=stage.actors),
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


def read_shards(uri: str, columns: list[str] | None = None) -> Any:
    """A folder of Parquet shards as a dataset, read by IO_TASK_CPUS tasks, one per file.

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
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=max(1, len(files)))
    return ds.map_batches(_read_shard, fn_kwargs={"columns": columns}, batch_size=1, num_cpus=IO_TASK_CPUS)


def _read_shard(batch: dict, columns: list[str] | None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysel.io import fs as rfs

    for uri in batch["uri"]:
        fs, path = rfs.resolve(str(uri))
        for record_batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=4096, columns=columns):
            yield pa.Table.from_batches([record_batch])

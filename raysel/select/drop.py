"""Drop steps: rows that leave before any policy sees them (near-duplicates, likely-mislabelled rows), on Ray.

A drop step reads every row of the shards before it and writes them all again, with one more column,
`dropped`: "" for a row that stays a candidate, else why it left ("near-duplicate of X (cos 0.97)",
"likely mislabelled: el2n 2.31, among the noisiest 10%"). Later steps, the statistics, the cuts and the
apply pass read the last step's shards: a row with a `dropped` reason is no candidate there
(stream.RayBlocks), and the apply pass writes it to the ledger as `rejected` with that reason; the
in-memory path (pipeline.select_pass) does the same. The budget stays a fraction of the candidates
before any step (as with no step), capped at the rows that remain.

    class DropStep(Protocol):
        name: str                                    # the manifest's key: selection.<name>
        def settings(self) -> dict: ...              # what, beyond its input shards, decides its output
        def run(self, source: DropInput, out_uri: str) -> dict: ...   # write out_uri; the manifest's info

`run` writes every row of `source.uri` (plus `dropped`) as shards under `out_uri`, in Ray tasks; a row
already dropped keeps its reason. The driver learns counts only: `drop_pass` tallies each step's output per
cluster (one small Counter per block) and keeps the step's info and tallies beside its shards, so a later
run with the same input and settings reuses both. The shards live at WORK/<key>/<assigned>-<step>-<hash>,
keyed by the shards before them and the step's settings. The steps run in a fixed order: semdedup (which
reads the embeddings from the scored shards, so it comes first), then drop_noisy.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards
from raysel.io import fs as rfs

if TYPE_CHECKING:
    from raysel.config import RunConfig
    from raysel.select.stream import Repeats

DROPPED = "dropped"  # the column: "" for a candidate, else the reason the row left before the policy


@dataclass(frozen=True)
class DropInput:
    """What a drop step reads.

    Attributes:
        uri: every row (the assigned shards, or the previous step's output, which has `dropped`).
        repeats: the rows quarantined as repeated ids (stream.repeated_ids), never candidates.
        scores_uri: the scored shards (with the embeddings).
        centroids: pass 2's centroids.
        config: the run.
    """

    uri: str
    repeats: Repeats
    scores_uri: str
    centroids: np.ndarray
    config: RunConfig


class DropStep(Protocol):
    name: str

    def settings(self) -> dict[str, Any]: ...

    def run(self, source: DropInput, out_uri: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Dropped:
    """What the drop steps leave: the shards every later pass reads, and the counts the manifest shows.

    Attributes:
        uri: the last step's shards (the assigned shards when no step is set).
        candidates: candidate rows before any step (the budget's base).
        info: per step name, its info with `dropped` (rows), `dropped_per_cluster`, `reused` and `seconds`.
    """

    uri: str
    candidates: int | None
    info: dict[str, dict[str, Any]]


def drop_steps(config: RunConfig) -> list[DropStep]:
    """The configured steps, in the order they run."""
    from raysel.select.noisy import DropNoisy
    from raysel.select.semdedup import SemDedup

    steps: list[DropStep] = []
    if config.select.semdedup is not None:
        steps.append(SemDedup(config))
    if config.select.drop_noisy is not None:
        steps.append(DropNoisy(config))
    return steps


def drop_pass(
    config: RunConfig, *, assigned_uri: str, repeats: Repeats, scores_uri: str, centroids: np.ndarray
) -> Dropped:
    """Run the configured drop steps on Ray (each reused when its shards are committed); see the module docstring."""
    steps = drop_steps(config)
    if not steps:
        return Dropped(assigned_uri, None, {})
    uri, candidates, info = assigned_uri, None, {}
    before: Counter[int] | None = None
    for step in steps:
        # the shards before it and the scores it may read (the rescored shards' folder names their settings)
        key = {"after": uri.rstrip("/").rsplit("/", 1)[-1], "scores": scores_uri.rstrip("/").split("/")[-2:]}
        key.update(step.settings())
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        out = f"{uri.rstrip('/')}-{step.name}-{digest}"
        done = rfs.join(out, "_SUCCESS")
        start, reused = time.perf_counter(), rfs.exists(done)
        if reused:
            kept = json.loads(rfs.read_text(rfs.join(out, "info.json")))
        else:
            rfs.delete_dir(out)
            step_info = step.run(DropInput(uri, repeats, scores_uri, centroids, config), out)
            tally = tally_dropped(out, repeats)
            kept = {"info": step_info, **tally}
            rfs.write_text(rfs.join(out, "info.json"), json.dumps(kept))
            rfs.write_text(done, "")
        dropped = Counter({int(c): n for c, n in kept["dropped"].items()})
        if before is None:
            candidates = int(kept["candidates"])
            before = Counter()
        mine = dropped - before  # this step's rows: the output's dropped rows less those dropped before it
        info[step.name] = {
            **kept["info"],
            "dropped": int(sum(mine.values())),
            "dropped_per_cluster": {int(c): int(n) for c, n in sorted(mine.items())},
            "reused": reused,
            "seconds": round(time.perf_counter() - start, 3),
        }
        before, uri = dropped, out
    return Dropped(uri, candidates, info)


def tally_dropped(uri: str, repeats: Repeats) -> dict[str, Any]:
    """{"candidates": rows that reached the steps, "dropped": {cluster: rows with a `dropped` reason}}, per block
    in Ray tasks; the driver adds up O(clusters) counts."""
    ds = read_shards(uri, columns=["reason", "source", "row", "cluster", DROPPED]).map_batches(
        _tally_block, fn_kwargs={"repeats": repeats}, batch_format="numpy", batch_size=None, num_cpus=IO_TASK_CPUS
    )
    candidates, dropped = 0, Counter()
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for blob in batch["result"]:
            part = pickle.loads(blob)
            candidates += part["candidates"]
            dropped.update(part["dropped"])
    return {"candidates": candidates, "dropped": {str(c): n for c, n in sorted(dropped.items())}}


def _tally_block(batch: dict[str, np.ndarray], repeats: Repeats) -> dict[str, np.ndarray]:
    from raysel.select.stream import with_repeats

    batch = with_repeats(batch, repeats)
    reached = batch["reason"] == ""
    gone = reached & (batch[DROPPED] != "")
    clusters, counts = np.unique(np.asarray(batch["cluster"], dtype=np.int64)[gone], return_counts=True)
    part = {"candidates": int(reached.sum()), "dropped": dict(zip(clusters.tolist(), counts.tolist(), strict=True))}
    return {"result": np.array([pickle.dumps(part)], dtype=object)}


def candidate_mask(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Rows still candidates: no quarantine reason and (when a step ran) no drop reason. Repeats applied first."""
    rows = np.asarray(batch["reason"], dtype=object) == ""
    if DROPPED in batch:
        rows &= np.asarray(batch[DROPPED], dtype=object) == ""
    return rows


def with_dropped(table: pa.Table, reasons: np.ndarray) -> pa.Table:
    """`table` with its `dropped` column set to `reasons` where they are not "" (earlier reasons kept)."""
    new = np.asarray(reasons, dtype=object)
    if DROPPED in table.column_names:
        old = table.column(DROPPED).to_numpy(zero_copy_only=False).astype(object)
        new = np.where(old != "", old, new)
        table = table.drop_columns([DROPPED])
    return table.append_column(DROPPED, pa.array(new.astype(str).tolist(), type=pa.string()))


def has_dropped(uri: str) -> bool:
    """Whether the shards at `uri` carry the `dropped` column (a drop step's output)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = rfs.resolve(uri)
    for info in sorted(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)), key=lambda i: i.path):
        if info.path.endswith(".parquet"):
            return DROPPED in pq.read_schema(fs.open_input_file(info.path)).names
    return False

"""One selection run, top-down: read → score → cluster → select → write.

pass 1  score     Ray Data streams the corpus files through the reader, the embedding actor pool
                  and the scorer actor pools; the scored shards (id, scores, embedding, provenance,
                  quarantine reason) go to the work dir, keyed by what determines them, and are
                  reused by any later run with the same input, models and scorer settings.
pass 2  cluster   FAISS spherical k-means on a seeded sample of the embeddings (centroids kept in
                  the work dir), then every row assigned to its nearest centroid in a map (the
                  assigned shards, without embeddings, kept in the work dir too).
pass 3  select    repeated ids; the drop steps (semdedup, drop_noisy: raysel/select/drop.py) in Ray
                  tasks, writing shards where a dropped row carries its reason; then a planned policy
                  (random, topk, threshold, stratified, hard_easy, bandit, ccs, d2) plans on per-cluster
                  statistics and finds its exact cuts in a few passes over the rows: the driver
                  holds O(clusters × 256) counts (and the bandit's probe queues), never a row per
                  row (d2 first adds its column per cluster in Ray tasks: `policy.rows`). The
                  others (mig) collect ids, clusters and scores on the driver, up to a limit.
pass 4  write     OUT/ledger (one row per input row; written by the workers for a planned policy),
                  OUT/selected (the chosen rows joined back to their original records, per input
                  file, in tasks), OUT/manifest.json, and OUT/_SUCCESS last.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from raysel import __version__
from raysel._internal.ray_stage import IO_TASK_CPUS, init_ray, map_stages, read_shards
from raysel.cluster import train_centroids
from raysel.config import RunConfig, ScorerConfig
from raysel.context import RunContext, sample_rows
from raysel.embed import Embedder
from raysel.errors import ConfigError, InputError, RayselError, RunFailed
from raysel.io import fs as rfs
from raysel.io.read import CorpusReader, InputFile, check_input, list_input
from raysel.io.sink import OutputSink, is_committed
from raysel.models import model_fingerprint
from raysel.scorers import SCORERS
from raysel.select import POLICIES, Candidates, Policy, budget_rows
from raysel.select.drop import DROPPED, Dropped, drop_pass
from raysel.select.plan import CutService, Plan
from raysel.select.stream import (
    Repeats,
    apply_pass,
    assign_pass,
    candidate_runner,
    repeated_ids,
    selection_stats,
    summarize_ledger,
)
from raysel.write import write_selected

# Bump when a change to reading or scoring changes what pass 1 writes: old shards are then not reused.
SCORES_FORMAT = 1


@dataclass
class RunResult:
    output: str
    manifest: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def run(config: RunConfig, *, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run one selection end to end and commit its output. Raises RayselError subclasses on bad input.

    The run owns its output folder from `sink.prepare` to the commit (io/sink.py); on any failure it gives the
    folder up with the previous result, if any, untouched. A failure that is not the user's is re-raised as
    RunFailed, which names the pass, the run id and how to continue.

    Args:
        config: the run.
        overwrite: replace a committed or interrupted run in the output folder (once this one commits).
        resume: continue an interrupted run in the output folder (same config); the work it committed to
            the work dir (scored shards, bandit rounds) is reused, not recomputed.
    """
    files = list_input(config.input)
    check_input(files, config.input)  # an unusable input fails here, before the output folder is touched
    sink = OutputSink(config.output.path, overwrite=overwrite or config.output.overwrite, resume=resume)
    sink.prepare(config_digest(config))
    timings: dict[str, float] = {}
    try:
        return _run_passes(config, files, sink, timings)
    except RayselError:
        sink.abandon()
        raise
    except Exception as err:
        sink.abandon()
        failed = next((p for p in PASSES if p not in timings), PASSES[-1])
        if is_committed(config.output.path):
            how = "the committed result there is untouched; rerun with --overwrite (computed scores are reused)"
        else:
            how = "rerun the same command with --resume to continue (computed scores are reused)"
        cause = _root_cause(err)
        raise RunFailed(
            f"the {failed} pass failed: {type(cause).__name__}: {cause}\n  run {sink.run_id}; {how}. "
            "Set RAYSEL_DEBUG=1 for the traceback."
        ) from err
    except BaseException:  # KeyboardInterrupt, SystemExit from a signal: give the folder up, then stop
        sink.abandon()
        raise


PASSES = ("score", "cluster", "select", "write")


def _root_cause(err: BaseException) -> BaseException:
    """The error under Ray's wrappers (RayTaskError → UserCodeException → the UDF's own exception)."""
    seen = {id(err)}
    while (inner := getattr(err, "cause", None) or err.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def _run_passes(config: RunConfig, files: list[InputFile], sink: OutputSink, timings: dict[str, float]) -> RunResult:
    init_ray(config.ray.address)
    with _timed(timings, "score"):
        scores_uri, score_key, score_info = score_pass(config, files)
        scores_uri = rescore_pass(config, files, scores_uri, score_key)
    reuse = {"scores": {"key": score_key, "uri": scores_uri, **score_info}}
    with _timed(timings, "cluster"):
        try:
            centroids, clusters_reused = cluster_pass(config, scores_uri, score_key)
        except _NoUsableRows:
            centroids, clusters_reused = np.zeros((0, 0), dtype=np.float32), False
        assigned = assign_pass(scores_uri, centroids, _assigned_uri(config, score_key, scores_uri), config.shard_rows)
    reuse["clusters"] = {"reused": clusters_reused}
    if len(centroids) == 0:
        return _commit_all_quarantined(config, files, sink, assigned, timings, reuse)
    policy = POLICIES[config.select.policy](config.select)
    plan = None
    context = RunContext(config, scores_uri, rfs.join(config.resolved_work_dir(), score_key), files, centroids)
    with _timed(timings, "select"):
        repeats = repeated_ids(assigned)
        drops = drop_pass(config, assigned_uri=assigned, repeats=repeats, scores_uri=scores_uri, centroids=centroids)
        rows = drops.uri
        if streams(config):
            if type(policy).rows is not Policy.rows and drops.uri != assigned:  # refused before d2's tasks run
                raise ConfigError(
                    f"policy {config.select.policy!r} computes its own column over the assigned shards and does not "
                    "combine with select.semdedup or select.drop_noisy yet; drop those, or choose another policy"
                )
            rows = policy.rows(drops.uri, context, centroids)  # d2: a column computed per cluster in Ray tasks
            plan, info = plan_pass(config, policy, replace(drops, uri=rows), repeats, context)
        else:  # a policy that is greedy over rows: in memory, on the driver
            _check_driver_rows(config, rfs.parquet_rows(drops.uri))
            table = collect_rows(drops.uri)
            table, info = select_pass(config, table, context)
            info.update(drops.info)
    with _timed(timings, "write"):
        if plan is not None:
            apply_pass(rows, repeats, policy, plan, sink.ledger_uri)
        else:
            sink.write_ledger(table)
        summary = summarize_ledger(sink.ledger_uri, config.score_columns, len(centroids))
        written = write_selected(config, files, sink, summary["status"].get("selected", 0))
    manifest = _manifest(config, files, summary, timings, info, written, centroids, reuse)
    sink.commit(manifest)  # manifest.json, then _SUCCESS
    return RunResult(config.output.path, manifest, manifest["counts"])


def plan_pass(
    config: RunConfig, policy: Policy, drops: Dropped, repeats: Repeats, context: RunContext | None = None
) -> tuple[Plan, dict[str, Any]]:
    """Pass 3 for a planned policy: per-cluster statistics of the rows left after the drop steps, then the
    policy's plan, its cuts found in a few passes over the candidate columns (raysel/select/stream.py). The budget
    is a fraction of the candidates before the drop steps, capped at the rows left. Returns (plan, summary)."""
    labels = config.input.label_field is not None
    runner = candidate_runner(drops.uri, repeats, [*config.score_columns, *policy.reads], labels=labels)
    stats = replace(selection_stats(runner), context=context)
    before = stats.usable if drops.candidates is None else drops.candidates
    budget = min(budget_rows(config.select.budget, before), stats.usable)
    cuts = CutService(runner)
    plan = policy.plan(stats, budget, cuts)
    info = {"policy": config.select.policy, "budget_rows": budget, "usable_rows": stats.usable, **plan.info}
    return plan, {**info, "passes": cuts.passes, **drops.info}


def streams(config: RunConfig) -> bool:
    """Whether the run's selection is planned on statistics and applied in the stream (no row on the driver)."""
    return POLICIES[config.select.policy].plan is not Policy.plan


# The in-memory selection (mig) holds about 0.5 KB a row on the driver: 10M rows is ~5 GB. A policy may state
# a lower, measured limit of its own (`row_limit`: raysel/select/mig.py).
MAX_DRIVER_ROWS = int(os.environ.get("RAYSEL_MAX_DRIVER_ROWS", 10_000_000))


def _check_driver_rows(config: RunConfig, rows: int) -> None:
    """Refuse, before the driver runs out of memory, an in-memory selection of more rows than it is sized for."""
    cls = POLICIES[config.select.policy]
    own = getattr(cls, "row_limit", None)
    limit, env, size = MAX_DRIVER_ROWS, "RAYSEL_MAX_DRIVER_ROWS", "about 0.5 KB a row"
    if own is not None and own.rows < limit:
        limit, env, size = own.rows, own.env, f"about {own.bytes_per_row / 1000:.1f} KB a row"
    if rows <= limit:
        return
    planned = sorted(name for name, c in POLICIES.items() if c.plan is not Policy.plan)
    instead = [own.alternatives] if own is not None else []
    instead += [
        f"use a policy planned on statistics ({', '.join(planned)}), which never holds the rows on the driver",
        f"set {env} higher on a driver with the memory",
    ]
    advice = "; or ".join(instead)
    raise ConfigError(
        f"policy {config.select.policy!r} selects in memory on the driver ({size}) and takes at most {limit:,} rows; "
        f"this corpus has {rows:,}. {advice[0].upper()}{advice[1:]}"
    )


class _NoUsableRows(Exception):
    """Pass 2 found nothing to cluster: every row was quarantined."""


def _commit_all_quarantined(config, files, sink, assigned, timings, reuse) -> RunResult:
    """Commit the ledger of a corpus with no usable row (every row quarantined, with its reason), then fail
    with the reasons: the user learns why from the message and finds each row in the ledger."""
    with _timed(timings, "write"):
        table = collect_rows(assigned)
        table = table.add_column(1, "status", pa.array(["quarantined"] * table.num_rows, type=pa.string()))
        sink.write_ledger(table)
        summary = summarize_ledger(sink.ledger_uri, config.score_columns, 0)
        written = write_selected(config, files, sink, 0)
    info = {"policy": config.select.policy, "budget_rows": 0, "usable_rows": 0}
    manifest = _manifest(config, files, summary, timings, info, written, np.zeros((0, 0)), reuse)
    sink.commit(manifest)
    top = "; ".join(f"{n} × {r}" for r, n in list(manifest["quarantine_reasons"].items())[:3])
    raise InputError(
        f"no usable row in the {table.num_rows} rows read ({top}); nothing was selected. The ledger, committed "
        f"at {rfs.join(config.output.path, 'ledger')}, gives each row's reason"
    )


# --- pass 1: score -------------------------------------------------------------------------------------------


def config_digest(config: RunConfig) -> str:
    """What a resumed run must share with the run it continues."""
    data = config.model_dump(mode="json", exclude={"output": {"overwrite"}, "ray": True})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def score_key(config: RunConfig, files: list[InputFile]) -> str:
    """What determines pass 1's output: the input's content, the reading settings, the models and scorers."""
    text_scorers = [s for s in config.scorers if getattr(SCORERS[s.name], "inputs", "text") == "text"]
    # A target file named in params stands for its content too (settings_digest): rewritten, it is a new key.
    scorer_settings = rfs.settings_digest(
        [s.model_dump(include={"name", "model", "max_tokens", "device", "params"}) for s in text_scorers]
    )
    reading = config.input.model_dump(exclude={"path"})
    if not reading["score_fields"]:  # left out when unused, so the work dirs of runs before the field still count
        del reading["score_fields"]
    key = {
        "format": SCORES_FORMAT,
        # per file, its content's hash and how it was taken (rfs.fingerprint_method; the manifest counts them)
        "files": [
            (f.rel, f.size, digest, rfs.fingerprint_method(f.uri, f.size, f.mtime_ns))
            for f, digest in zip(files, rfs.fingerprints([f.uri for f in files]), strict=True)
        ],
        "input": reading,
        "embed": config.embed.model_dump(include={"model", "max_tokens", "device"}),
        "embed_model": model_fingerprint(config.embed.model, "encoder"),
        "scorers": scorer_settings,
        "scorer_models": sorted({model_fingerprint(s.model, "causal_lm") for s in text_scorers}),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def scorer_stages(scorers: list[ScorerConfig], inputs: str) -> list[tuple[type, ScorerConfig, tuple[str, ...]]]:
    """Group scorers that share a class and settings into one stage: one model pass computes them all."""
    groups: dict[tuple, list[ScorerConfig]] = {}
    for s in scorers:
        if getattr(SCORERS[s.name], "inputs", "text") != inputs:
            continue
        groups.setdefault((SCORERS[s.name], s.stage_key()), []).append(s)
    return [(cls, group[0], tuple(s.name for s in group)) for (cls, _), group in groups.items()]


def score_pass(config: RunConfig, files: list[InputFile]) -> tuple[str, str, dict[str, Any]]:
    """Pass 1. Returns (scores folder, reuse key, {reused, resumed_rows, scored_rows}).

    Shards are committed one by one as Ray writes them; a pass that was interrupted is resumed at the
    row: rows already in readable shards are skipped by the reader, half-written shards are discarded.
    """

    key = score_key(config, files)
    base = rfs.join(config.resolved_work_dir(), key)
    scores_uri = rfs.join(base, "scores")
    if rfs.exists(rfs.join(base, "_SUCCESS")):
        return scores_uri, key, {"reused": True, "resumed_rows": 0, "scored_rows": 0}
    done, resumed = completed_rows(scores_uri)

    stages = [(Embedder, config.embed, {"config": config.embed})] + [
        (cls, cfg, {"config": cfg, "outputs": outputs}) for cls, cfg, outputs in scorer_stages(config.scorers, "text")
    ]
    ds = map_stages(read_corpus(files, config.input, skip_rows=done), stages)
    # At an I/O task's CPUs, so that it fuses into the write: at Ray's default 1 CPU it is an operator of its own
    # whose reservation leaves an elastic scorer pool too little budget to add an actor.
    write_shards(ds.drop_columns(["text"], num_cpus=IO_TASK_CPUS), scores_uri, config.shard_rows)
    total = rfs.parquet_rows(scores_uri)  # footers only: the driver's memory does not grow with the corpus
    rfs.write_text(rfs.join(base, "meta.json"), json.dumps({"key": key, "config": config.model_dump()}, indent=2))
    rfs.write_text(rfs.join(base, "_SUCCESS"), "")
    return scores_uri, key, {"reused": False, "resumed_rows": resumed, "scored_rows": total - resumed}


def completed_rows(scores_uri: str) -> tuple[dict[str, np.ndarray], int]:
    """({source file: rows} already in readable shards, their count); deletes shards cut off mid-write."""
    import pyarrow.parquet as pq

    fs, path = rfs.resolve(scores_uri)
    found: dict[str, list[np.ndarray]] = {}
    total = 0
    for info in fs.get_file_info(pa.fs.FileSelector(path, allow_not_found=True)):
        if not info.path.endswith(".parquet"):
            continue
        try:
            table = pq.read_table(fs.open_input_file(info.path), columns=["source", "row"])
        except (OSError, pa.ArrowException):
            fs.delete_file(info.path)  # a shard the interrupted run did not finish writing
            continue
        total += table.num_rows
        for part in table.group_by("source").aggregate([("row", "list")]).to_pylist():
            found.setdefault(part["source"], []).append(np.asarray(part["row_list"], dtype=np.int64))
    return {src: np.unique(np.concatenate(parts)) for src, parts in found.items()}, total


def rescore_pass(config: RunConfig, files: list[InputFile], scores_uri: str, key: str) -> str:
    """Pass 1b: scorers that read the scored shards (embeddings, labels), each after its driver-side `prepare`.

    Returns the folder of shards that carry every score (pass 1's own when there are no such scorers)."""

    stages = scorer_stages(config.scorers, "scored")
    if not stages:
        return scores_uri
    settings = [cfg.model_dump(exclude={"actors", "resources", "threads", "batch_size"}) for _, cfg, _ in stages]
    rkey = rfs.settings_digest(settings)  # a target file rewritten under the same name is a new key
    base = rfs.join(rfs.join(config.resolved_work_dir(), key), f"rescored-{rkey}")
    out_uri = rfs.join(base, "scores")
    if rfs.exists(rfs.join(base, "_SUCCESS")):
        return out_uri
    rfs.delete_dir(out_uri)
    context = RunContext(config, scores_uri, rfs.join(config.resolved_work_dir(), key), files)
    pools = []
    for cls, cfg, outputs in stages:
        prepared = cls.prepare(cfg, context) if hasattr(cls, "prepare") else None
        pools.append((cls, cfg, {"config": cfg, "outputs": outputs, "prepared": prepared}))
    ds = map_stages(read_shards(scores_uri), pools)
    write_shards(ds, out_uri, config.shard_rows)
    rfs.write_text(rfs.join(base, "_SUCCESS"), "")
    return out_uri


def read_corpus(files: list[InputFile], config: Any, skip_rows: dict | None = None) -> Any:
    """The corpus as a stream of usable and quarantined rows (CorpusReader), one IO_TASK_CPUS task per file."""
    import ray

    ds = ray.data.from_items([{"uri": f.uri, "rel": f.rel} for f in files], override_num_blocks=len(files))
    return ds.map_batches(
        _read_files, fn_kwargs={"config": config, "skip_rows": skip_rows}, batch_size=1, num_cpus=IO_TASK_CPUS
    )


def write_shards(ds: Any, uri: str, rows: int) -> None:
    """Write `ds` as Parquet shards of at least `rows` rows (the last may be smaller), each committed whole."""
    # In input order, not the order blocks finish in: the same input gives the same shards, and with them the same
    # ledger files on the same layout (tests/test_determinism.py).
    ds.context.execution_options.preserve_order = True
    fs, path = rfs.resolve(uri)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows, ray_remote_args={"num_cpus": IO_TASK_CPUS})


def _read_files(batch: dict[str, np.ndarray], config: Any, skip_rows: dict | None = None):
    skip = {rel: skip_rows[rel] for rel in batch["rel"] if rel in skip_rows} if skip_rows else None
    yield from CorpusReader(config, skip_rows=skip)(batch)


# --- pass 2: cluster -----------------------------------------------------------------------------------------


def _cluster_key(config: RunConfig, key: str) -> str:
    return hashlib.sha256(f"{key}|{config.cluster.model_dump_json()}".encode()).hexdigest()[:16]


def _assigned_uri(config: RunConfig, key: str, scores_uri: str) -> str:
    """The assigned shards (every row with its cluster, no embedding) of these scores and centroids. They copy the
    scores: the rescored shards' folder (rescored-<their settings' hash>) is part of the name, so a run with other
    rescoring settings does not reuse another's scores."""
    rescored = scores_uri.rstrip("/").split("/")[-2]  # "<key>" for pass 1's shards, else "rescored-<hash>"
    suffix = f"-{rescored.removeprefix('rescored-')}" if rescored.startswith("rescored-") else ""
    return rfs.join(rfs.join(config.resolved_work_dir(), key), f"assigned-{_cluster_key(config, key)}{suffix}")


def cluster_pass(config: RunConfig, scores_uri: str, key: str) -> tuple[np.ndarray, bool]:
    """Pass 2: centroids trained on a seeded, order-independent sample of usable embeddings (cached); then
    `assign_pass` gives every row its cluster."""
    cfg = config.cluster
    uri = rfs.join(rfs.join(config.resolved_work_dir(), key), f"centroids-{_cluster_key(config, key)}.npy")
    if rfs.exists(uri):
        fs, path = rfs.resolve(uri)
        with fs.open_input_file(path) as f:
            return np.load(f), True
    sample = sample_rows(scores_uri, ["embedding"], cfg.sample, cfg.seed).get("embedding", np.empty((0, 0)))
    if len(sample) == 0:
        raise _NoUsableRows()
    centroids = train_centroids(sample, cfg)
    fs, path = rfs.resolve(uri)
    import io

    buf = io.BytesIO()
    np.save(buf, centroids)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())
    return centroids, False


# --- pass 3: select ------------------------------------------------------------------------------------------


def collect_rows(assigned_uri: str) -> pa.Table:
    """Every row's id, provenance, scores and cluster on the driver, sorted by id: the in-memory path, for the
    policies without a plan (mig). O(rows) driver memory (about 0.5 KB a row)."""
    tables = [t for t in read_shards(assigned_uri).iter_batches(batch_format="pyarrow", batch_size=None)]
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    table = table.sort_by([("id", "ascending"), ("source", "ascending"), ("row", "ascending")])
    return _quarantine_duplicate_ids(table)


def _quarantine_duplicate_ids(table: pa.Table) -> pa.Table:
    """A repeated id keeps its first (file, row) occurrence; later ones are quarantined, saying where it was."""
    ids = table.column("id").to_numpy(zero_copy_only=False)
    reasons = table.column("reason").to_numpy(zero_copy_only=False).copy()
    usable = np.flatnonzero(reasons == "")
    if len(usable) < 2:
        return table
    uid = ids[usable]
    repeat = np.concatenate([[False], uid[1:] == uid[:-1]])
    if not repeat.any():
        return table
    sources = table.column("source").to_numpy(zero_copy_only=False)
    rows = table.column("row").to_numpy()
    first = usable[0]
    for pos, idx in enumerate(usable):
        if not repeat[pos]:
            first = idx
        else:
            reasons[idx] = f"duplicate id (first at {sources[first]}:{rows[first]})"
    return table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, type=pa.string()))


def select_pass(
    config: RunConfig, table: pa.Table, context: RunContext | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """Run the policy on the usable rows; add `status` and fill `reason` for every row.

    Policies that need more than ids, clusters and scores (embeddings, an expensive scorer to probe
    with) find the run's `RunContext` in `candidates.context`. Rows a drop step dropped (the `dropped` column of
    its shards: raysel/select/drop.py) are rejected with that reason; the budget is a fraction of the usable rows
    before them."""
    reasons = table.column("reason").to_numpy(zero_copy_only=False).astype(object)
    budget = budget_rows(config.select.budget, int((reasons == "").sum()))
    dropped = np.zeros(0, dtype=np.int64)
    if DROPPED in table.column_names:  # rows that left before the policy (drop steps)
        why = table.column(DROPPED).to_numpy(zero_copy_only=False).astype(object)
        dropped = np.flatnonzero((reasons == "") & (why != ""))
        reasons[dropped] = why[dropped]
        table = table.drop_columns([DROPPED])
    usable = np.flatnonzero(reasons == "")
    candidates = Candidates(
        ids=table.column("id").to_numpy(zero_copy_only=False)[usable],
        cluster=table.column("cluster").to_numpy()[usable],
        scores={
            s: table.column(s).to_numpy(zero_copy_only=False)[usable].astype(np.float64) for s in config.score_columns
        },
        labels=_column(table, "label", usable),
        context=context,
        centroid_sim=_column(table, "centroid_sim", usable),
    )
    budget = min(budget, len(candidates))
    policy = POLICIES[config.select.policy](config.select)
    selection = policy.select(candidates, budget)
    status = np.full(table.num_rows, "quarantined", dtype=object)
    status[usable] = np.where(selection.selected, "selected", "rejected")
    status[dropped] = "rejected"
    reasons[usable] = selection.reasons
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reasons, type=pa.string()))
    table = table.add_column(1, "status", pa.array(status, type=pa.string()))
    info = {"policy": config.select.policy, "budget_rows": budget, "usable_rows": len(candidates), **selection.info}
    return table, info


def _column(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray | None:
    return table.column(name).to_numpy(zero_copy_only=False)[rows] if name in table.column_names else None


def _manifest(config, files, summary, timings, selection_info, written, centroids, reuse) -> dict[str, Any]:
    """The run's manifest; `summary` is `summarize_ledger`'s view of the ledger (counts, reasons, flags, sizes)."""
    skipped = getattr(files, "skipped", ())  # list_input's InputFiles; a plain list skipped nothing
    counts = summary["status"]
    # The score columns (raysel's scorers, the input's score fields) and, per column, how many usable rows
    # (selected or rejected) have no value (NaN): a policy ranks those last.
    scores = {
        "scorers": [s.name for s in config.scorers],
        "fields": list(config.input.score_fields),
        "unscored": dict(summary["unscored"]),
    }
    return {
        "raysel_version": __version__,
        "created_unix": round(time.time(), 3),
        "config": json.loads(config.model_dump_json()),
        "input": {
            "files": len(files),
            "bytes": sum(f.size for f in files),
            "rows": summary["rows"],
            "fingerprint": dict(Counter(rfs.fingerprint_method(f.uri, f.size, f.mtime_ns) for f in files)),
            "skipped_files": {"count": len(skipped), "names": list(skipped[:100])},  # files of no input format
        },
        "counts": {s: counts.get(s, 0) for s in ("selected", "rejected", "quarantined")},
        "quarantine_reasons": dict(summary["reasons"].most_common(20)),
        "truncated": dict(summary["flags"]),
        "scores": scores,
        "selection": selection_info,
        "selected_rows_written": written,
        "clusters": {"k": int(len(centroids)), "sizes": summary["sizes"].tolist()},
        "reuse": reuse,
        "seconds": dict(timings),
        # From the installed packages' metadata: importing torch and transformers only to read their versions
        # added ~200 MiB to the driver's peak (RESULTS §19), which does not run a model.
        "versions": {"python": platform.python_version(), **_package_versions()},
    }


# The packages whose versions the manifest records, each under the distribution names it ships as.
PACKAGES_IN_MANIFEST = {
    "ray": ("ray",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "pyarrow": ("pyarrow",),
}


def _package_versions() -> dict[str, str | None]:
    """{package: its installed version, None when absent}, from the package metadata alone (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {name: next(filter(None, map(installed, dists)), None) for name, dists in PACKAGES_IN_MANIFEST.items()}

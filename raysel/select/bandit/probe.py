"""Scoring a chosen handful of rows with any registered scorer, in a Ray actor pool that lives for the rounds.

The bandit policy asks, round after round, for the expensive score of a few hundred rows. The scorer
runs in a pool of Ray actors kept for the probe's life, so a model (an LM for `loss` or `lm_influence`)
loads once per actor, not once per round. A scorer with a `prepare` classmethod (e.g. influence: the
target set's gradient) has it run once, on the driver, first. Each probed row reaches its actor as its
row of the run's scored shards (id, reason, source, row, embedding, label, the cheap scores), plus its
text joined back from the input for scorers that read text (`raysel.io.read.CorpusReader(keep_rows=...)`,
as pass 4's `raysel.write.write_selected` does).

    QueueProbe  (plan/apply) rows named by their probe-queue code (raysel/select/bandit/queues.py). One
                pass over the scored shards, at the start, finds each queue entry's file and row; each
                round, Ray tasks read the rows (and texts) of one actor call each and hand them to the
                actors through the object store: the driver sends codes and gets back one float per row.
    Probe       (the in-memory `select`) rows named by candidate index, read through a `ShardIndex` and
                the texts joined on the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysel.config import InputConfig, ScorerConfig
from raysel.errors import InputError
from raysel.io import fs as rfs
from raysel.io.shards import ShardIndex, list_shards, take_rows

# Text reads for probes run beside the probe's scorer actors, which may hold every CPU (a lost node's actors
# restart on the nodes left): they reserve no CPU, so they always run, and at most this many run at once.
TEXT_READ_TASKS = 8


def read_texts(files: list[Any], config: InputConfig, source: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The texts of the rows (source, row) from the input files, as pass 1 saw them (cut at `max_chars`).

    Up to TEXT_READ_TASKS Ray tasks, each a `CorpusReader(keep_rows=...)` pass over some of the input files
    that hold wanted rows.
    """
    import ray

    wanted: dict[str, list[int]] = {}
    for s, r in zip(source, row, strict=True):
        wanted.setdefault(str(s), []).append(int(r))
    by_rel = {f.rel: f for f in files}
    missing = [rel for rel in wanted if rel not in by_rel]
    if missing:
        raise InputError(f"input file {missing[0]!r} of a probed row is no longer in input.path; rerun the run")
    items = [(by_rel[rel].uri, rel, rows) for rel, rows in wanted.items()]
    task = ray.remote(num_cpus=0)(_texts_of_files)
    futures = [task.remote(items[i::TEXT_READ_TASKS], config) for i in range(min(len(items), TEXT_READ_TASKS))]
    found: dict[tuple[str, int], str] = {}
    for result in ray.get(futures):
        found.update(result)
    return np.array([found[(str(s), int(r))] for s, r in zip(source, row, strict=True)], dtype=object)


def _texts_of_files(items: list[tuple[str, str, list[int]]], config: InputConfig) -> dict[tuple[str, int], str]:
    from raysel.io.read import CorpusReader

    out = {}
    for uri, rel, rows in items:
        reader = CorpusReader(config, keep_rows={rel: rows})
        for records in reader({"uri": np.array([uri]), "rel": np.array([rel])}):
            texts = records.column(config.text_field).to_pylist()
            for r, text in zip(records.column("__row").to_pylist(), texts, strict=True):
                out[(rel, int(r))] = str(text)[: config.max_chars]
    return out


class ScorerHost:
    """One probe actor: builds the scorer once and returns its score column for each batch it is sent.

    Args:
        cls: the registered scorer class.
        config: the scorer's config.
        prepared: what the scorer's `prepare` returned (None without one).
    """

    def __init__(self, cls: type, config: ScorerConfig, prepared: Any = None) -> None:
        self.name = config.name
        self.scorer = cls(config, (config.name,), prepared)

    def score(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.scorer(batch)[self.name], dtype=np.float64)


class _ScorerPool:
    """The probe's scorer in a Ray actor pool kept for the probe's life (`actors`, `resources` of its config).

    Args:
        scorer: the scorer's config.
        context: the run context (scored shards, input files, config), for the scorer's `prepare`.
    """

    def __init__(self, scorer: ScorerConfig, context: Any) -> None:
        import ray
        import ray.data  # noqa: F401  (registers the tensor type the embedding column is stored as)
        from ray.util import ActorPool

        from raysel._internal.ray_stage import RESTARTABLE_ACTOR, fit_cpus
        from raysel.scorers import SCORERS

        cls = SCORERS[scorer.name]
        self.config = scorer
        self.context = context
        self.inputs = getattr(cls, "inputs", "text")
        prepared = cls.prepare(scorer, context) if hasattr(cls, "prepare") else None
        cpus = fit_cpus([scorer], ray.cluster_resources().get("CPU", 1.0))[0]
        # Spread over nodes, restartable, calls retried: a lost node costs its actors a restart elsewhere and the
        # calls in flight a retry (scoring is idempotent), not the run.
        host = ray.remote(
            num_cpus=cpus,
            num_gpus=scorer.resources.gpus,
            scheduling_strategy="SPREAD",
            **RESTARTABLE_ACTOR,
        )(ScorerHost)
        # A plain ActorPool does not grow: an elastic `actors: {min, max}` starts the actors it can count on.
        self.actors = [host.remote(cls, scorer, prepared) for _ in range(scorer.pool_size[0])]
        self.pool = ActorPool(self.actors)

    @property
    def call_rows(self) -> int:
        """Rows in one actor call: BATCHES_PER_CALL of the scorer's batches."""
        from raysel._internal.ray_stage import BATCHES_PER_CALL

        return self.config.batch_size * BATCHES_PER_CALL

    def _scores(self, chunks: list[Any]) -> np.ndarray:
        """One float per row of each chunk (a batch, or an ObjectRef to one), in order."""
        return np.concatenate(list(self.pool.map(lambda actor, b: actor.score.remote(b), chunks)))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class Probe(_ScorerPool):
    """Scores chosen candidates (by index) with one registered scorer: the in-memory `select`'s probe.

    Args:
        scorer: the scorer's config (its `actors`, `resources` and `batch_size` size the pool).
        context: the run context (scored shards, input files, config).
        index: the candidates' shard index.

    Example:
        >>> probe = Probe(ScorerConfig(name="loss"), context, index)        # doctest: +SKIP
        >>> probe.score(np.array([3, 17, 42]))                              # one float per row
        >>> probe.close()
    """

    def __init__(self, scorer: ScorerConfig, context: Any, index: ShardIndex) -> None:
        super().__init__(scorer, context)
        self.index = index

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The scorer's input for candidates `idx`: their shard row, plus `text` for text scorers."""
        from ray.data.block import BlockAccessor

        table = self.index.read(idx)
        batch = dict(BlockAccessor.for_block(table).to_batch_format("numpy"))
        if self.inputs == "text":
            batch["text"] = read_texts(
                self.context.files, self.context.config.input, self.index.source[idx], self.index.row[idx]
            )
        return batch

    def score(self, idx: np.ndarray) -> np.ndarray:
        """The scorer's value for each candidate in `idx` (NaN where it gives none), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros(0)
        batch = self.batch(idx)
        step = self.call_rows
        return self._scores([{c: v[i : i + step] for c, v in batch.items()} for i in range(0, len(idx), step)])


class QueueProbe(_ScorerPool):
    """Scores probe-queue entries (by code) with one registered scorer; the rows go from the shards and the input
    files to the actors in Ray tasks, never through the driver.

    Args:
        scorer: the scorer's config (its `actors`, `resources` and `batch_size` size the pool).
        context: the run context (scored shards, input files, config).
        queues: the probe queues (raysel/select/bandit/queues.py).

    Example:
        >>> probe = QueueProbe(ScorerConfig(name="lm_influence", params={...}), context, queues)   # doctest: +SKIP
        >>> probe.score(np.array([0, 1, 5]))        # one float per code, in that order
        >>> probe.close()
    """

    def __init__(self, scorer: ScorerConfig, context: Any, queues: Any) -> None:
        super().__init__(scorer, context)  # the actors start loading their model while the entries are found
        self.queues = queues
        self.paths, self.file_rows = locate(context.scores_uri, queues.source, queues.row)
        self.uris = {f.rel: f.uri for f in context.files}

    def score(self, codes: np.ndarray) -> np.ndarray:
        """The scorer's value for each code (NaN where it gives none), in that order."""
        import ray

        at = self.queues.positions(codes)
        if len(at) == 0:
            return np.zeros(0)
        missing = sorted({str(s) for s in self.queues.source[at]} - set(self.uris))
        if missing:
            raise InputError(f"input file {missing[0]!r} of a probed row is no longer in input.path; rerun the run")
        read = ray.remote(num_cpus=0)(_probe_rows)  # reserves no CPU: see TEXT_READ_TASKS
        config = self.context.config.input if self.inputs == "text" else None
        step = self.call_rows
        chunks = []
        for i in range(0, len(at), step):
            part = at[i : i + step]
            sources = [str(s) for s in self.queues.source[part]]
            chunks.append(
                read.remote(
                    self.context.scores_uri,
                    [self.paths[j] for j in part],
                    self.file_rows[part],
                    [(self.uris[s], s, int(r)) for s, r in zip(sources, self.queues.row[part], strict=True)],
                    config,
                )
            )
        return self._scores(chunks)


def locate(scores_uri: str, source: np.ndarray, row: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(shard file, row in file) of each usable row (source[i], row[i]) of the scored shards: one pass over their
    reason/source/row columns in Ray tasks, each sending back only the rows asked for.

    Raises:
        InputError: when a row is not among the usable rows of the shards (they changed under the run).
    """
    import ray

    fs, paths = list_shards(scores_uri)
    wanted = ray.put({(str(s), int(r)): i for i, (s, r) in enumerate(zip(source, row, strict=True))})
    cpus = int(ray.cluster_resources().get("CPU", 1))
    groups = [paths[i :: max(1, 2 * cpus)] for i in range(min(len(paths), max(1, 2 * cpus)))]
    task = ray.remote(num_cpus=0)(_locate_in_files)
    at_path = np.full(len(source), -1, dtype=np.int64)
    at_row = np.full(len(source), -1, dtype=np.int64)
    names = {p: n for n, p in enumerate(paths)}
    for found in ray.get([task.remote(scores_uri, g, wanted) for g in groups]):
        for path, entries, file_rows in found:
            at_path[entries], at_row[entries] = names[path], file_rows
    if (at_path < 0).any():
        i = int(np.flatnonzero(at_path < 0)[0])
        raise InputError(
            f"the probe row {source[i]}:{row[i]} is not among the usable rows of the scored shards at {scores_uri}; "
            "the shards changed under the run: rerun it"
        )
    return [paths[j] for j in at_path], at_row


def _locate_in_files(scores_uri: str, paths: list[str], wanted: dict[tuple[str, int], int]) -> list[tuple]:
    import pyarrow.parquet as pq

    fs, _ = rfs.resolve(scores_uri)
    out = []
    for path in paths:
        t = pq.ParquetFile(fs.open_input_file(path)).read(columns=["reason", "source", "row"])
        reasons = t.column("reason").to_numpy(zero_copy_only=False)
        sources = t.column("source").to_numpy(zero_copy_only=False)
        rows = t.column("row").to_numpy()
        hits = [
            (wanted[(str(sources[j]), int(rows[j]))], j)
            for j in np.flatnonzero(reasons == "")
            if (str(sources[j]), int(rows[j])) in wanted
        ]
        if hits:
            entries, file_rows = zip(*hits, strict=True)
            out.append((path, np.array(entries, dtype=np.int64), np.array(file_rows, dtype=np.int64)))
    return out


def _probe_rows(
    scores_uri: str, paths: list[str], file_rows: np.ndarray, texts_of: list[tuple[str, str, int]], config: Any
) -> dict[str, np.ndarray]:
    """One actor call's rows (a Ray task): their shard rows, and their texts when `config` (the input's) is given."""
    from ray.data.block import BlockAccessor

    fs, _ = rfs.resolve(scores_uri)
    batch = dict(BlockAccessor.for_block(take_rows(fs, paths, file_rows)).to_batch_format("numpy"))
    if config is not None:
        wanted: dict[tuple[str, str], list[int]] = {}
        for uri, rel, r in texts_of:
            wanted.setdefault((uri, rel), []).append(r)
        found = _texts_of_files([(uri, rel, rows) for (uri, rel), rows in wanted.items()], config)
        batch["text"] = np.array([found[(rel, r)] for _, rel, r in texts_of], dtype=object)
    return batch

"""Scoring a chosen handful of rows with any registered scorer.

The bandit policy asks, round after round, for the expensive score of a few hundred rows it names
by candidate index. `Probe` answers: it reads those rows from the run's scored shards
(`context.scores_uri`: id, reason, source, row, embedding, label, the cheap scores; through
raysel/io/shards.py's `ShardIndex`), joins their texts back from the input for scorers that read text
(`raysel.io.read.CorpusReader(keep_rows=...)`, as the pipeline's `write_selected` does), and runs the
scorer in a pool of Ray actors that lives as long as the probe, so a model loads once per actor, not
once per round. A scorer with a `prepare` classmethod (e.g. influence: the target set's gradient) has it
run once, on the driver, first. Only the rows asked for are scored: `rows_scored` counts them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysel.config import InputConfig, ScorerConfig
from raysel.errors import InputError
from raysel.io.shards import ShardIndex

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


class Probe:
    """Scores chosen candidates with one registered scorer, in a Ray actor pool kept for the probe's life.

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
        import ray
        import ray.data  # noqa: F401  (registers the tensor type the embedding column is stored as)
        from ray.util import ActorPool

        from raysel._internal.ray_stage import RESTARTABLE_ACTOR, fit_cpus
        from raysel.scorers import SCORERS

        cls = SCORERS[scorer.name]
        self.config = scorer
        self.context = context
        self.index = index
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
        self.actors = [host.remote(cls, scorer, prepared) for _ in range(scorer.actors)]
        self.pool = ActorPool(self.actors)
        self.rows_scored = 0

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
        from raysel._internal.ray_stage import BATCHES_PER_CALL

        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros(0)
        batch = self.batch(idx)
        step = self.config.batch_size * BATCHES_PER_CALL
        chunks = [{c: v[i : i + step] for c, v in batch.items()} for i in range(0, len(idx), step)]
        scores = np.concatenate(list(self.pool.map(lambda actor, b: actor.score.remote(b), chunks)))
        self.rows_scored += len(idx)
        return scores

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

"""`select.drop_noisy`: before any policy, drop the rows most likely mislabelled, by a noise score.

    select:
      drop_noisy: {score: el2n, fraction: 0.1}         # the noisiest 10 % of the candidate rows
      drop_noisy: {score: aum, order: asc, threshold: 0}   # every row whose margin is at or below 0

The noisiest rows are those with the highest score (`order: desc`, the default: el2n, loss) or the lowest
(`order: asc`: aum, where a negative area under the margin marks a label the model keeps contradicting).
`fraction` drops round(fraction × candidates) rows (rounded half up), found by one exact global cut
(raysel/select/plan.py's CutService: ties broken by a seeded hash of the id, as every cut); `threshold`
drops every row at or beyond it. Unscored rows (NaN) are never dropped. A dropped row is `rejected`
with a reason such as "likely mislabelled: el2n 2.31, among the noisiest 10%".

A drop step (raysel/select/drop.py): the cut's passes and the marking run in Ray tasks over the shards
before it; the driver holds the cut's histograms only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raysel.select.cuts import Cut
from raysel.select.drop import DROPPED, DropInput, candidate_mask, with_dropped
from raysel.select.plan import CutService, Eligible, Plan, Step

if TYPE_CHECKING:
    from raysel.config import RunConfig


class DropNoisy:
    """The `select.drop_noisy` drop step (module docstring).

    Args:
        config: the run (`select.drop_noisy`; `select.seed` breaks ties in the cut).
    """

    name = "drop_noisy"

    def __init__(self, config: RunConfig) -> None:
        self.config = config.select.drop_noisy
        self.seed = config.select.seed
        self.shard_rows = config.shard_rows

    def settings(self) -> dict[str, Any]:
        return {**self.config.model_dump(), "seed": self.seed}

    def step(self, quota: int = 0) -> Step:
        """The cut: the `quota` noisiest scored rows of the whole corpus (or, with a threshold, those beyond it)."""
        cfg = self.config
        # Eligible: at or beyond the threshold; without one, every scored row (NaN passes no bound)
        bound = cfg.threshold if cfg.threshold is not None else (-np.inf if cfg.order == "desc" else np.inf)
        return Step(
            score=cfg.score,
            order=cfg.order,
            group_by="all",
            quotas={0: quota},
            seed=self.seed,
            eligible=Eligible(threshold=bound),
        )

    def plan(self, cuts: CutService, candidates: int) -> Step:
        """The step with its cut found over the candidate rows (a few passes through `cuts`)."""
        step = self.step()
        eligible = cuts.count(step, []).get(0, 0)
        if self.config.threshold is not None:
            return replace(step, quotas={0: eligible}, cuts={0: Cut.all()})  # every row beyond it
        want = min(eligible, int(np.floor(self.config.fraction * candidates + 0.5)))
        return cuts.find(replace(step, quotas={0: want}), [], {0: eligible})

    def reason(self, values: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.threshold is not None:
            side = "at or above" if cfg.order == "desc" else "at or below"
            rule = f"{side} the threshold {cfg.threshold:g}"
        else:
            rule = f"among the noisiest {round(cfg.fraction * 100, 6):g}%"  # 0.1 → 10%, 0.125 → 12.5%
        return np.array([f"likely mislabelled: {cfg.score} {v:.3g}, {rule}" for v in values], dtype=object)

    def run(self, source: DropInput, out_uri: str) -> dict[str, Any]:
        from raysel._internal.ray_stage import IO_TASK_CPUS, read_shards
        from raysel.pipeline import write_shards
        from raysel.select.stream import candidate_runner, selection_stats

        runner = candidate_runner(source.uri, source.repeats, [self.config.score])
        cuts = CutService(runner)
        candidates = selection_stats(runner).usable
        step = self.plan(cuts, candidates)
        marked = read_shards(source.uri).map_batches(
            _mark_block,
            fn_kwargs={"drop": self, "step": step, "repeats": source.repeats},
            batch_format="pyarrow",
            num_cpus=IO_TASK_CPUS,
        )
        write_shards(marked, out_uri, self.shard_rows)
        cut = step.cut_value()
        return {
            "score": self.config.score,
            "order": self.config.order,
            **({"fraction": self.config.fraction} if self.config.fraction is not None else {}),
            **({"threshold": self.config.threshold} if self.config.threshold is not None else {}),
            "cut": float(cut) if np.isfinite(cut) else None,
            "passes": cuts.passes,
        }

    def drops(self, batch: dict[str, np.ndarray], step: Step) -> np.ndarray:
        """Which of a block's candidate rows the step drops (the rows its cut keeps: the noisiest)."""
        (kept,) = Plan((step,)).kept(batch)
        return kept


def _mark_block(table: pa.Table, drop: DropNoisy, step: Step, repeats: Any) -> pa.Table:
    from raysel.select.stream import with_repeats

    columns = ["id", "reason", "source", "row", "cluster", drop.config.score]
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    if DROPPED in table.column_names:
        batch[DROPPED] = table.column(DROPPED).to_numpy(zero_copy_only=False)
    batch = with_repeats(batch, repeats)
    rows = np.flatnonzero(candidate_mask(batch))
    reasons = np.full(table.num_rows, "", dtype=object)
    if len(rows):
        sub = {c: v[rows] for c, v in batch.items()}
        hit = drop.drops(sub, step)
        values = np.asarray(sub[drop.config.score], dtype=np.float64)
        reasons[rows[hit]] = drop.reason(values[hit])
    return with_dropped(table, reasons)

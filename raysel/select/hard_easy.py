"""The `hard_easy` policy: a fixed mix of the hardest and the easiest rows by any score (arXiv 2311.16302).

Of a budget of B rows, round(hard_fraction * B) are the hardest by `select.score` and the rest
the easiest (or, with `easy: random`, drawn at random from the rows that are not among the hardest).
The paper's mix is 10 % hard, 90 % easy. "Hard" is the high end of the score with `select.order:
desc` (a loss, an EL2N, an entropy) and the low end with `order: asc`. Rows without a score (NaN)
are taken last, by either side.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysel.select import Candidates, Policy, Selection, rank, register_policy
from raysel.select.plan import CutService, Eligible, Plan, SelectionStats


class HardEasyParams(BaseModel):
    """Settings of the `hard_easy` policy (`select.params`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hard_fraction: float = Field(0.1, ge=0, le=1, description="the share of the budget that goes to the hardest rows")
    easy: Literal["easiest", "random"] = Field("easiest", description="how the rest of the budget is filled")


@register_policy("hard_easy")
class HardEasyPolicy(Policy):
    """round(hard_fraction * budget) hardest rows by `select.score`, the rest of the budget from the easy end.

    Example:
        >>> cfg = SelectConfig(budget=20, policy="hard_easy", score="loss", params={"hard_fraction": 0.1})
        >>> HardEasyPolicy(cfg).select(candidates, 20)     # doctest: +SKIP  (2 hardest + 18 easiest)
    """

    Params = HardEasyParams

    def select(self, candidates: Candidates, budget: int) -> Selection:
        params: HardEasyParams = self.config.typed_params()
        name = self.config.score
        values = candidates.scores[name]
        n_hard = int(round(params.hard_fraction * budget))
        n_easy = budget - n_hard
        hardest_first = rank(values, self.config.order)  # NaN last
        hard = hardest_first[:n_hard]
        rest = hardest_first[n_hard:]
        if params.easy == "easiest":
            scored = rest[~np.isnan(values[rest])]
            easy_pool = np.concatenate([scored[::-1], rest[np.isnan(values[rest])]])
            easy = easy_pool[:n_easy]
        else:
            rng = np.random.default_rng(self.config.seed)
            easy = rng.choice(rest, size=min(n_easy, len(rest)), replace=False)
        selected = np.zeros(len(candidates), dtype=bool)
        selected[hard] = True
        selected[easy] = True
        easy_words = f"the {n_easy} easiest" if params.easy == "easiest" else f"the {n_easy} drawn at random"
        reasons = np.where(selected, "", f"neither among the {n_hard} hardest nor {easy_words} by {name}")
        info = {
            "hard": n_hard,
            "easy": int(len(easy)),
            "hard_cut": _finite(values[hard[-1]]) if n_hard else None,
            "easy_cut": _finite(values[easy[-1]]) if params.easy == "easiest" and len(easy) else None,
        }
        return Selection(selected, reasons.astype(object), info)

    def plan(self, stats: SelectionStats, budget: int, cuts: CutService) -> Plan:
        params: HardEasyParams = self.config.typed_params()
        n_hard = int(round(params.hard_fraction * budget))
        n_easy = budget - n_hard
        hard = cuts.find(self._step(n_hard), [], {0: stats.usable})
        # The easy end: the other order (NaN still last, as float_key puts it), or the seeded hash for `random`.
        easy_order = "asc" if self.config.order == "desc" else "desc"
        score = self.config.score if params.easy == "easiest" else None
        easy = self._step(n_easy, score=score, order=easy_order, eligible=Eligible(not_kept_by=(0,)))
        easy = cuts.find(easy, [hard], {0: stats.usable - min(n_hard, stats.usable)})
        info = {
            "hard": n_hard,
            "easy": int(min(n_easy, stats.usable - n_hard)),
            "hard_cut": _finite(hard.cut_value()) if n_hard else None,
            "easy_cut": _finite(easy.cut_value()) if params.easy == "easiest" and n_easy else None,
        }
        return Plan((hard, easy), info)

    def apply(self, batch: dict[str, np.ndarray], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        hard, easy = plan.kept(batch)
        kept = hard | easy
        n_hard, n_easy = plan.steps[0].quotas[0], plan.steps[1].quotas[0]
        easy_words = f"the {n_easy} easiest" if plan.steps[1].score else f"the {n_easy} drawn at random"
        reason = f"neither among the {n_hard} hardest nor {easy_words} by {self.config.score}"
        return kept, np.where(kept, "", reason).astype(object)


def _finite(value: float) -> float | None:
    """A cut for the manifest: None where the budget reached unscored (NaN) rows, which JSON cannot hold."""
    return float(value) if np.isfinite(value) else None

"""Scorers: one file per signal, one interface, one explicit registry.

A scorer is a small Ray-agnostic class: `__init__(config, outputs, prepared=None)` loads its model
once per actor; `__call__(batch) -> batch` adds one float column per name in `outputs` (NaN for
quarantined rows, whose `reason` is not empty). The pipeline runs every scorer alike, in an actor
pool; scorers that share a model and settings (e.g. `entropy` and `loss`) share one pass.

Class attributes a scorer may set:
    inputs = "text"     (default) runs in pass 1's stream and reads `text`;
    inputs = "scored"   runs after pass 1 over the scored shards and reads `embedding`, `label`,
                        the cheap scores; for scorers built on a proxy model trained on embeddings.
    Params              a frozen pydantic model of its settings (`scorers[i].params` in the config).
    prepare(config, context) -> dict     a classmethod run once on the driver before the scorer's
                        pass (e.g. train a proxy model on `context.sample(...)`, write it under
                        `context.artifact_dir`); its result reaches every actor as `prepared`.
"""

from __future__ import annotations

from collections.abc import Callable

SCORERS: dict[str, type] = {}


def register_scorer(*names: str) -> Callable[[type], type]:
    """Register a scorer class under the score names it can produce."""

    def wrap(cls: type) -> type:
        for name in names:
            if name in SCORERS:
                raise ValueError(f"scorer {name!r} is registered twice ({SCORERS[name].__name__}, {cls.__name__})")
            SCORERS[name] = cls
        return cls

    return wrap


# lm registers entropy, loss, el2n_lm; lm_influence the LM-gradient influence; the others are proxy-based.
from raysel.scorers import aum, classifier_entropy, el2n, influence, lm, lm_influence, vog  # noqa: E402,F401

__all__ = ["SCORERS", "register_scorer"]

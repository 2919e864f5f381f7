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
                        `context.work_dir`); its result reaches every actor as `prepared`.

A new scorer is one module here (`@register_scorer("name")` on its class), its path in the built-ins of
`SCORERS` in raysel/registry.py (imported on the first lookup; this package imports no scorer), and one test
file in tests/scorers/ (docs/architecture.md, "Adding a scorer or a policy").
"""

from raysel.registry import SCORERS, register_scorer

__all__ = ["SCORERS", "register_scorer"]

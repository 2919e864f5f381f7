"""raysel: score and select language-model training data on Ray.

>>> from raysel import load_config, run                                      # doctest: +SKIP
>>> result = run(load_config("run.yaml"))
"""

__version__ = "0.1.0"

from raysel.config import RunConfig, load_config  # noqa: E402
from raysel.errors import ConfigError, InputError, ModelError, RayselError, ScorerError, SinkError  # noqa: E402
from raysel.scorers import SCORERS, register_scorer  # noqa: E402
from raysel.select import POLICIES, register_policy  # noqa: E402


def run(config: RunConfig, *, overwrite: bool = False, resume: bool = False):
    """Run one selection end to end (see raysel.pipeline.run)."""
    from raysel.pipeline import run as _run

    return _run(config, overwrite=overwrite, resume=resume)


__all__ = [
    "POLICIES",
    "SCORERS",
    "ConfigError",
    "InputError",
    "ModelError",
    "RayselError",
    "RunConfig",
    "ScorerError",
    "SinkError",
    "load_config",
    "register_policy",
    "register_scorer",
    "run",
]

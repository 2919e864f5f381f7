"""Selection policies: the base (raysel/select/base.py) and one module per policy."""

from raysel.select.base import (
    POLICIES,
    Candidates,
    Policy,
    Selection,
    budget_rows,
    largest_remainder,
    rank,
    register_policy,
    take_within_clusters,
)

__all__ = [
    "POLICIES",
    "Candidates",
    "Policy",
    "Selection",
    "budget_rows",
    "largest_remainder",
    "rank",
    "register_policy",
    "take_within_clusters",
]

# The policies register themselves on import (they import from this package).
from raysel.select import bandit, hard_easy, mig, simple  # noqa: E402,F401

"""Selection policies: the base (raysel/select/base.py) and one module per policy, registered by name in
raysel/registry.py (`POLICIES`), which imports the built-in ones on the first lookup."""

from raysel.registry import POLICIES, register_policy
from raysel.select.base import (
    Candidates,
    Policy,
    Selection,
    budget_rows,
    largest_remainder,
    rank,
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

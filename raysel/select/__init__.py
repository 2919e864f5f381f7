"""Selection policies: the base (raysel/select/base.py) and one module per policy, registered by name in
raysel/registry.py (`POLICIES`), which imports the built-in ones on the first lookup."""

from raysel.registry import POLICIES, register_policy
from raysel.select.base import (
    Balance,
    Candidates,
    Policy,
    Selection,
    budget_rows,
    candidate_groups,
    group_name,
    largest_remainder,
    proportional_quotas,
    rank,
    take_within_clusters,
)

__all__ = [
    "POLICIES",
    "Balance",
    "Candidates",
    "Policy",
    "Selection",
    "budget_rows",
    "candidate_groups",
    "group_name",
    "largest_remainder",
    "proportional_quotas",
    "rank",
    "register_policy",
    "take_within_clusters",
]

"""Pure tensor functions shared by every method: no module state, no hooks."""

from tokenprune.core.merge import bipartite_soft_matching, reduce_tokens
from tokenprune.core.prune import fuse_plan, keep_top_k
from tokenprune.core.schedule import resolve_schedule, solve_flops_schedule

__all__ = [
    "bipartite_soft_matching",
    "fuse_plan",
    "keep_top_k",
    "reduce_tokens",
    "resolve_schedule",
    "solve_flops_schedule",
]

"""``random``: drop as many tokens as a schedule says, chosen uniformly at random. The honest baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.merge import reduce_tokens
from tokenprune.core.prune import keep_top_k
from tokenprune.methods.base import LayerContext, Method, SeededRandom
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class RandomConfig(ReductionConfig):
    """Random pruning baseline: drop the same number of tokens as a schedule, chosen uniformly.

    Attributes:
        seed: Seed of the patch's own generator (None: nondeterministic).
    """

    seed: int | None = 0


class RandomDrop(Method):
    """Keep a uniformly random subset (in spatial order); dropped tokens leave no trace."""

    name = "random"
    kinds = frozenset({"vit", "dense"})
    identity = {"r": 0}
    example = {"r": 2}
    batch_invariant = False  # one generator draws for the whole batch

    def __init__(self, config: RandomConfig) -> None:
        super().__init__(config)
        self._random = SeededRandom(config.seed)

    def max_removable(self, reducible: int) -> int:
        return max(reducible - 1, 0)  # keep one patch token so pooling stays defined

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        scores = self._random.rand(x.shape[:2], x.device)
        kept = keep_top_k(scores, x.shape[1] - state.num_protected - r, state.num_protected)
        return reduce_tokens(x, state, kept)


register_method("random", RandomConfig, RandomDrop)

"""``random``: drop as many tokens as a schedule says, chosen uniformly at random. The honest baseline."""

from __future__ import annotations

import torch

from tokenprune.config import RandomConfig
from tokenprune.core.merge import reduce_tokens
from tokenprune.core.prune import keep_top_k
from tokenprune.methods.base import LayerContext, Method
from tokenprune.registry import register_method
from tokenprune.state import TokenState


class RandomDrop(Method):
    """Keep a uniformly random subset (in spatial order); dropped tokens leave no trace."""

    name = "random"

    def __init__(self, config: RandomConfig) -> None:
        super().__init__(config)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.config.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[device]

    def max_removable(self, reducible: int) -> int:
        return max(reducible - 1, 0)  # keep one patch token so pooling stays defined

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        scores = torch.rand(x.shape[:2], device=x.device, generator=self._generator(x.device))
        kept = keep_top_k(scores, x.shape[1] - state.num_protected - r, state.num_protected)
        return reduce_tokens(x, state, kept)


register_method("random", RandomConfig, RandomDrop)

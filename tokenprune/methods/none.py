"""``none``: the patched model runs every token. The control row of every sweep."""

from __future__ import annotations

import torch

from tokenprune.config import NoneConfig
from tokenprune.methods.base import LayerContext, Method
from tokenprune.registry import register_method
from tokenprune.state import TokenState


class NoReduction(Method):
    """Removes nothing."""

    name = "none"

    def max_removable(self, reducible: int) -> int:
        return 0

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        return x


register_method("none", NoneConfig, NoReduction)

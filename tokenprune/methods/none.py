"""``none``: the patched model runs every token. The control row of every sweep.

It speaks both method interfaces: on a ViT it removes nothing per layer; on a vision-language model
(``LlavaForConditionalGeneration`` and the other VLM adapters) its plan keeps every visual token in every layer,
so the patched model is bit-identical to the unpatched one while still logging per-layer token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.config import ReductionConfig
from tokenprune.methods.base import LayerContext
from tokenprune.methods.vlm import VisualPlan, VisualTokenMethod
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class NoneConfig(ReductionConfig):
    """The ``none`` method: the patched model runs every token (a control for sweeps)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (isinstance(self.r, int) and self.r) or (isinstance(self.r, list) and any(self.r)):
            raise ValueError("method 'none' removes no tokens: r must be 0")
        if self.flops not in (None, 1.0):
            raise ValueError("method 'none' removes no tokens: flops must be 1.0 or unset")


class NoReduction(VisualTokenMethod):
    """Removes nothing (ViTs and vision-language models alike)."""

    name = "none"
    kinds = frozenset({"vit", "vlm", "dense"})
    identity = {}
    control = True
    example = {}

    def max_removable(self, reducible: int) -> int:
        return 0

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        return x

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        return VisualPlan.identity(depth)

    def candidates(self, visual: int) -> list[float]:
        return [1.0]


register_method("none", NoneConfig, NoReduction)

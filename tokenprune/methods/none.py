"""``none``: the patched model runs every token. The control row of every sweep.

It speaks both method interfaces: on a ViT it removes nothing per layer; on a vision-language model
(``LlavaForConditionalGeneration`` and the other VLM adapters) its plan keeps every visual token in every layer,
so the patched model is bit-identical to the unpatched one while still logging per-layer token counts.
"""

from __future__ import annotations

import torch

from tokenprune.config import NoneConfig
from tokenprune.methods.base import LayerContext
from tokenprune.methods.vlm_configs import VisualPlan, VisualTokenMethod
from tokenprune.registry import register_method
from tokenprune.state import TokenState


class NoReduction(VisualTokenMethod):
    """Removes nothing (ViTs and vision-language models alike)."""

    name = "none"
    kinds = frozenset({"vit", "vlm", "dense"})
    identity = {}
    example = {}

    def max_removable(self, reducible: int) -> int:
        return 0

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        return x

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        return VisualPlan(1.0, (1.0,) * depth)

    def candidates(self, visual: int) -> list[float]:
        return [1.0]


register_method("none", NoneConfig, NoReduction)

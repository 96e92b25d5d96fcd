"""``fastv``: FastV (Chen et al., 2024), "An Image is Worth 1/2 Tokens After Layer 2".

After layer ``k`` (FastV's K), keep the ``keep`` fraction of visual tokens that the last prompt token attends
to most (attention averaged over heads, from layer ``k - 1``); later layers, and their KV cache, hold only the
kept visual tokens. Text is never removed.

Unlike FastV's reference code, the attention row is one extra ``(1 x D) @ (D x N)`` product per head on the
layer's own (rotary-embedded) queries and keys, so the model keeps its fused attention, and the tokens are
removed for real instead of masked (see ``tokenprune.adapters.vlm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.methods.vlm import (
    DecoderLayerContext,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
)
from tokenprune.registry import register_method


@dataclass
class FastVConfig(VLMReductionConfig):
    """FastV (Chen et al., 2024): after layer ``k``, keep the visual tokens the last token attends to most.

    Attributes:
        k: Layers that see every visual token (FastV's K). Layer ``k - 1``'s attention of the last prompt
            token scores the visual tokens; layers ``k ..`` see only the kept ones. ``1 <= k < depth``.
        keep: Fraction of visual tokens kept after layer ``k`` (FastV's ``1 - R``), in [0, 1]; default 0.5.
            Give ``keep`` or ``flops``, not both.
    """

    k: int = 2
    keep: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1 (layers that see every visual token), got {self.k!r}")
        self.ratio_or_flops("keep", 0.5)


class FastV(VisualTokenMethod):
    """Top-``keep`` visual tokens by the last token's attention, once, after layer ``k``."""

    name = "fastv"
    identity = {"keep": 1.0}
    example = {"k": 2, "keep": 0.5}
    query_rows = "last"
    budget_parameter = "keep"

    def validate(self, depth: int) -> None:
        if not 1 <= self.config.k < depth:
            raise ValueError(
                f"fastv k={self.config.k} is out of range for a language model of {depth} layers: "
                f"1 <= k <= {depth - 1} (k layers see every visual token)"
            )

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        keep = self.config.keep if value is None else value
        k = self.config.k
        return VisualPlan(1.0, tuple(1.0 if layer < k else keep for layer in range(depth)))

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        rows, row_valid = ctx.last_rows()  # (B, 1): the last prompt token of every sample
        return ctx.attention_rows(rows, row_valid)[:, 0]  # (B, N)


register_method("fastv", FastVConfig, FastV)

"""``evit``: EViT (Liang et al., 2022): keep tokens the class token attends to, fuse the rest into one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.merge import reduce_tokens
from tokenprune.core.prune import fuse_plan
from tokenprune.methods.base import LayerContext, Method
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class EViTConfig(ReductionConfig):
    """EViT: keep the tokens the class token attends to most, fuse the rest into one token.

    Attributes:
        prop_attn: Add ``log(size)`` to attention logits (off in EViT; on makes the fused token count
            as the tokens it holds).
    """

    prop_attn: bool = False


class EViT(Method):
    """Per layer, fuse the ``r + 1`` least attended tokens into one, weighted by their attention."""

    name = "evit"
    kinds = frozenset({"vit", "dense"})
    identity = {"r": 0}
    example = {"r": 2}
    needs = frozenset({"queries", "keys"})
    needs_class_token = True

    def max_removable(self, reducible: int) -> int:
        # r + 1 tokens are fused into one; at least one reducible token must stay besides the fused one.
        return max(reducible - 2, 0)

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        attention = ctx.class_attention()  # (B, N)
        src, dst, kept = fuse_plan(attention, r, state.num_protected)
        # EViT weights the fused token by attention; size-weighting enters through prop_attn if enabled.
        return reduce_tokens(x, state, kept, src, dst, weight=attention.unsqueeze(-1).to(x.dtype))

    def overhead_flops(self, num_tokens: int, num_protected: int, r: int, num_heads: int, head_dim: int) -> float:
        # One class-token query row per head against all keys.
        return 2.0 * num_tokens * num_heads * head_dim


register_method("evit", EViTConfig, EViT)

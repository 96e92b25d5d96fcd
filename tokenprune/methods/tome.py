"""``tome``: Token Merging (Bolya et al., 2023) by bipartite soft matching on attention keys.

On a vision-language model (``tokenprune.apply(llava, "tome", r=...)``) ToMe runs inside the vision tower, through
the tower's ViT adapter; the tower still hands the family's own code one feature per patch (each patch gets the
feature of the merged token holding it) and the tokens a merged group left are collapsed to one before the LLM, so
the LLM reads fewer visual tokens (see :mod:`tokenprune.adapters.vlm.tower_merge`; ``r`` and ``flops`` are those of
the tower: ``flops`` is then a fraction of the vision tower's FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.merge import bipartite_soft_matching, reduce_tokens
from tokenprune.methods.base import LayerContext, Method
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class ToMeConfig(ReductionConfig):
    """ToMe bipartite soft matching.

    Attributes:
        prop_attn: Proportional attention: add ``log(size)`` to attention logits so a merged token counts
            as the tokens it holds.
    """

    prop_attn: bool = True


class ToMe(Method):
    """Merge the ``r`` most similar A-B token pairs per layer, size-weighted, in spatial order."""

    name = "tome"
    kinds = frozenset({"vit", "dense", "vlm"})  # vlm: inside the vision tower
    identity = {"r": 0}
    example = {"r": 2}
    needs = frozenset({"keys"})

    def max_removable(self, reducible: int) -> int:
        # Only set-A tokens (every other reducible token) can be merged away.
        return reducible // 2

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        src, dst, kept = bipartite_soft_matching(ctx.key_metric(), r, state.num_protected)
        return reduce_tokens(x, state, kept, src, dst)

    def overhead_flops(self, num_tokens: int, num_protected: int, r: int, num_heads: int, head_dim: int) -> float:
        # (Na x D) @ (D x Nb) similarity of the head-averaged keys of the reducible tokens.
        reducible = num_tokens - num_protected
        set_a = (reducible + 1) // 2
        return 2.0 * set_a * (reducible - set_a) * head_dim


register_method("tome", ToMeConfig, ToMe)

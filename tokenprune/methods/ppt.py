"""``ppt``: PPT (Wu et al., 2023), "PPT: Token Pruning and Pooling for Efficient Vision Transformers".

Each image chooses, at every reducing layer, between pruning and pooling (merging) by how concentrated the
class token's attention is over the patch tokens: when the importance scores spread widely (their variance is
at least ``threshold``) the ``r`` least attended tokens are inattentive and are pruned; when they are nearly
uniform, importance says little and the ``r`` most redundant tokens are pooled by ToMe's bipartite soft matching
instead. Images of one batch may choose differently; each removes ``r`` tokens, so the batch stays rectangular.

Kept from the reference code (PPT's ``pp_block_adaptive``): the per-image, per-layer choice by the variance of
the normalised class-token importance, pruning the lowest-scored tokens, ToMe pooling with size-weighted
averages and proportional attention. Changed: the importance is the class-token attention alone (one extra
query row per head, so the layer's fused SDPA stays; the reference multiplies by each token's value norm, which
the capture hooks do not see); the variance is of ``M * score`` over the ``M`` patch tokens (scores summing to
``M``, mean 1), so one ``threshold`` means the same at any token count (the reference thresholds the raw variance
of scores summing to 1); the reference picks the reducing layers by a list and ``r`` by ``parse_r``, here the
library's schedule does (``r`` per layer, ``flops=`` or ``tokenprune.calibrate``); tokens stay in spatial order
and removal is real.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.merge import bipartite_soft_matching, reduce_tokens
from tokenprune.core.prune import keep_top_k
from tokenprune.methods.base import LayerContext, Method
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class PPTConfig(ReductionConfig):
    """PPT: prune by class-token attention where it is concentrated, pool (ToMe) where it is flat.

    Attributes:
        threshold: Variance of the patch tokens' importance (scaled to mean 1) at and above which an image prunes
            at a layer; below it, it pools. 0 prunes always; a huge value pools always.
        prop_attn: Proportional attention (``log(size)`` added to attention logits) once tokens are pooled.
    """

    threshold: float = 1.0
    prop_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"threshold is a variance, a number >= 0, got {self.threshold!r}")


def importance_variance(attention: torch.Tensor, num_protected: int) -> torch.Tensor:
    """Variance over the patch tokens of their class-token attention scaled to mean 1: ``(B, N) -> (B,)``."""
    scores = attention[:, num_protected:]  # (B, M)
    scaled = scores * scores.shape[1] / scores.sum(dim=1, keepdim=True)
    return scaled.var(dim=1)


class PPT(Method):
    """Per image and layer: prune the least attended tokens, or pool the most similar ones when attention is flat."""

    name = "ppt"
    kinds = frozenset({"vit"})
    identity = {"r": 0}
    example = {"r": 2}
    needs = frozenset({"queries", "keys"})
    needs_class_token = True

    def max_removable(self, reducible: int) -> int:
        return reducible // 2  # pooling merges set-A tokens only (ToMe's limit)

    def prunes(self, attention: torch.Tensor, num_protected: int) -> torch.Tensor:
        """``(B,)`` True for the images that prune at this layer (the others pool)."""
        return importance_variance(attention, num_protected) >= self.config.threshold

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        attention = ctx.class_attention()  # (B, N)
        prune = self.prunes(attention, state.num_protected)  # (B,)
        n_keep = x.shape[1] - state.num_protected - r
        if bool(prune.all()):
            return reduce_tokens(x, state, keep_top_k(attention, n_keep, state.num_protected))
        src, dst, kept = bipartite_soft_matching(ctx.key_metric(), r, state.num_protected)
        if not bool(prune.any()):
            return reduce_tokens(x, state, kept, src, dst)
        # Mixed batch: both reductions, then each image takes its own (tensors in state are replaced, not mutated).
        pooled_state = dataclasses.replace(state)
        pooled = reduce_tokens(x, pooled_state, kept, src, dst)  # (B, N - r, C)
        pruned = reduce_tokens(x, state, keep_top_k(attention, n_keep, state.num_protected))  # (B, N - r, C)
        rows = prune.view(-1, 1, 1)
        state.size = torch.where(rows, state.size, pooled_state.size)
        state.index = torch.where(prune.view(-1, 1), state.index, pooled_state.index)
        state.dropped = torch.where(prune, state.dropped, pooled_state.dropped)
        if state.source is not None:
            state.source = torch.where(rows, state.source, pooled_state.source)
        return torch.where(rows, pruned, pooled)

    def overhead_flops(self, num_tokens: int, num_protected: int, r: int, num_heads: int, head_dim: int) -> float:
        # One class-token query row per head against all keys, plus ToMe's A x B key similarity.
        reducible = num_tokens - num_protected
        set_a = (reducible + 1) // 2
        return 2.0 * num_tokens * num_heads * head_dim + 2.0 * set_a * (reducible - set_a) * head_dim


register_method("ppt", PPTConfig, PPT)

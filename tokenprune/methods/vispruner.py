"""``vispruner``: VisPruner (Zhang et al., ICCV 2025), "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs" (FasterVLM is its attention-only half).

Before the LLM, each image keeps ``K`` tokens: ``K_imp = floor(important * K)`` *important* ones, the patches the
class token attends to most in the penultimate tower layer (towers without a class token, e.g. SigLIP: the mean
attention each patch receives), and ``K - K_imp`` *diverse* ones, left from the others by de-duplication: the
others, in descending attention order, are split alternately into two halves ``a`` (even places) and ``b`` (odd);
each token of ``a`` scores its largest cosine similarity to any token of ``b``, and the ``r = min(8, R - K_div)``
highest-scoring tokens of ``a`` (the most duplicated) are dropped; the survivors of ``a`` (in descending score
order) followed by ``b`` are the next round's order, until ``K_div`` remain. The reference's split is half and half
(``important_ratio`` 0.5, its evaluation default); the default ``keep`` is the paper's smallest LLaVA-1.5 setting,
32 of 576 tokens (it reports 128, 64 and 32).

Kept from the reference code (github.com/Theia-4869/VisPruner, ``llava_arch.py``): the important ranking, the
alternating split, the 8-per-round removal, its orders (a round's order decides the next split) and its rounding of
the important count (``int(K * ratio)``). Changed: the tower's attention comes from hooks on its own queries and
keys (no ``output_attentions``: the tower stays on SDPA); the similarity is the cosine of the LLM-side (projected)
embeddings, not of the tower's features at that layer, which are not among the signals a method reads (for LLaVA
the embeddings are the projector's per-token MLP of exactly those features); all rounds read one ``m x m`` Gram
matrix of the ``m`` non-important tokens, computed once per image (the reference recomputes ``a @ b^T`` each
round), so the FLOPs are fixed (for LLaVA-1.5's 576 -> 32 about 6x fewer) and the result is the same up to float
rounding; sorts are stable (the reference's ``argsort`` breaks ties arbitrarily); any count of others works (the
reference's batched indexing fails on an odd one). Kept tokens are unmerged, in
spatial order, removed for real; LLaVA's class token is not among the LLM's tokens, so it is not kept. Paper
(abstract, arXiv 2412.01818): "VisPruner can reduce the FLOPs of LLaVA-1.5-7B by 91% and inference latency by 75%,
while maintaining comparable performance".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenprune.methods.vlm import PreLLMContext, SpanReduction, TowerLayerConfig, TowerLayerMethod, check_fraction
from tokenprune.registry import register_method

PER_ROUND = 8  # the reference's most duplicated tokens dropped per de-duplication round


@dataclass
class VisPrunerConfig(TowerLayerConfig):
    """VisPruner (Zhang et al., ICCV 2025): important tokens by tower attention, plus diverse ones by de-duplication.

    Attributes:
        keep: Fraction of each image's tokens kept before the LLM, in (0, 1]; default 32/576 (the paper's
            smallest LLaVA-1.5 setting) when neither ``tokens`` nor ``flops`` is given.
        tokens: Exact tokens kept per image (an int >= 1; an image with fewer keeps all of them).
            Give one of ``keep``, ``tokens`` or ``flops``.
        important: Fraction of the kept tokens that are important (by attention; rounded down, as the reference
            does), in [0, 1]; the rest are diverse. Default 0.5 (the reference's).
        layer: Vision-tower layer whose attention ranks the tokens (negative: from the end); default None: the
            penultimate (the paper's; LLaVA reads its features there), or the only one of a one-layer tower.
    """

    important: float = 0.5
    default_keep: ClassVar[float] = 32 / 576

    def __post_init__(self) -> None:
        super().__post_init__()
        self.important = check_fraction("important (fraction of the kept tokens)", self.important, False)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(S, k, C)`` the rows ``index`` ``(S, k)`` of ``x`` ``(S, n, C)``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def remove_duplicates(features: torch.Tensor, diverse: int) -> torch.Tensor:
    """The reference's iterative de-duplication of ``m`` ordered tokens down to ``diverse`` in each of ``S`` sets.

    Each round splits the current order alternately into ``a`` (even places) and ``b`` (odd), drops the
    ``min(8, R - diverse)`` tokens of ``a`` most cosine-similar to some token of ``b``, and continues with the
    rest of ``a`` (most distinct last) followed by ``b``. All rounds index one cosine Gram matrix.

    Args:
        features: ``(S, m, C)`` the tokens, in the order the first round splits.
        diverse: Tokens left, ``>= 1``.

    Returns:
        ``(S, min(m, diverse))`` rows of ``features`` left, in the last round's order.
    """
    s, m, _ = features.shape
    rows = torch.arange(m, device=features.device).expand(s, m)  # (S, R)
    if m <= diverse:
        return rows
    unit = F.normalize(features.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (S, m, m): the one matmul, 2 m^2 C per set
    spans = torch.arange(s, device=features.device)[:, None, None]
    while (drop := min(PER_ROUND, rows.shape[1] - diverse)) > 0:
        a, b = rows[:, ::2], rows[:, 1::2]  # (S, ceil(R/2)), (S, floor(R/2)); b is not empty: R > diverse >= 1
        closest = similarity[spans, a[:, :, None], b[:, None, :]].amax(dim=-1)  # (S, |a|) best match in b
        distinct = closest.sort(dim=1, descending=True, stable=True).indices[:, drop:]  # the least duplicated
        rows = torch.cat([a.gather(1, distinct), b], dim=1)
    return rows


class VisPruner(TowerLayerMethod):
    """Important tokens by the tower's attention, plus diverse ones left by similarity de-duplication."""

    name = "vispruner"
    identity = {"keep": 1.0}
    example = {"keep": 0.5}
    batch_invariant = True

    def split(self, keep: int) -> tuple[int, int]:
        """``(important, diverse)`` tokens of an image that keeps ``keep`` (important rounded down)."""
        important = min(keep, math.floor(self.config.important * keep + 1e-9))
        return important, keep - important

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        x, attention = ctx.embeds, ctx.tower.attention  # (S, n, C), (S, n)
        important, diverse = self.split(ctx.keep)
        if diverse == 0:
            return ctx.select(attention)
        order = attention.sort(dim=1, descending=True, stable=True).indices  # (S, n)
        rest = order[:, important:]  # (S, m) the others, by descending attention (the first split's order)
        left = rest.gather(1, remove_duplicates(gather_rows(x, rest), diverse))  # (S, Kd) span positions
        index = torch.cat([order[:, :important], left], dim=1).sort(dim=1).values  # (S, K) spatial order
        return SpanReduction(index, gather_rows(x, index), torch.ones_like(index, dtype=x.dtype))

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        important, diverse = self.split(min(keep, tokens))
        others = tokens - important
        if diverse == 0 or others <= diverse:
            return 0.0
        return 2.0 * others * others * channels  # the (m x C) @ (C x m) cosine Gram matrix


register_method("vispruner", VisPrunerConfig, VisPruner)

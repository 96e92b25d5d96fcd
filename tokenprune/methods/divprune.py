"""``divprune``: DivPrune (Alvar et al., CVPR 2025), "Diversity-based Visual Token Pruning for Large Multimodal Models".

Before the LLM, each image keeps the subset of its visual tokens that is most diverse: DivPrune casts pruning as
a Max-Min Diversity Problem (maximise the smallest pairwise cosine distance ``1 - cos`` of the kept set) and
solves it greedily on the projected visual embeddings. The first token is the most isolated one (the largest
distance to its nearest neighbour); each next one is the token farthest from the kept set (the largest minimum
distance to it). No attention is read, so the vision tower and the LLM keep their fused attention; kept tokens
are unmerged, in spatial order, and removed for real (see ``tokenprune.adapters.vlm``).

Kept from the reference code (github.com/vbdi/divprune): the distance (one ``n x n`` cosine Gram matrix per
image, the only matmul, in float32), the first pick and the greedy max-min rule. Changed: the spans of a batch
are selected together (batched over images, not batch size 1); an already kept token is never picked again
(the reference can re-pick one when every remaining token duplicates a kept one); ``tokens=N`` keeps an exact
count per image; kept tokens keep their original positions unless ``merge_positions="compact"`` (the reference
concatenates them, positions consecutive).

Headline (arXiv 2503.02175, abstract): "DivPrune achieves state-of-the-art accuracy over 16 image- and
video-language datasets"; its reference scripts keep 0.098 of the tokens (about 56 of LLaVA-1.5's 576).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenprune.methods.vlm import PreLLMConfig, PreLLMContext, PreLLMMethod, SpanReduction
from tokenprune.registry import register_method

DEFAULT_KEEP = 0.098  # the reference's retained ratio (SUBSET_RATIO): about 90% of the visual tokens pruned


@dataclass
class DivPruneConfig(PreLLMConfig):
    """DivPrune (Alvar et al., CVPR 2025): keep each image's most diverse visual tokens before the LLM.

    Attributes:
        keep: Fraction of each image's visual tokens kept, in (0, 1] (1 = nothing pruned); default 0.098
            (the reference's). Give one of ``keep``, ``tokens`` or ``flops``.
        tokens: Exact number of visual tokens kept per image, an int >= 1 (an image with fewer keeps all).
        merge_positions: ``"original"`` (each kept token keeps its position; later text too) or ``"compact"``
            (the reference: the LLM sees the prompt as if each image had fewer placeholders). Qwen2-VL's
            multi-axis positions need ``"original"``.
    """

    merge_positions: str = "original"
    default_keep: ClassVar[float] = DEFAULT_KEEP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_positions not in ("original", "compact"):
            raise ValueError(f"merge_positions must be 'original' or 'compact', got {self.merge_positions!r}")


def max_min_diverse(embeds: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy max-min cosine-distance selection of ``keep`` tokens in each of ``S`` sets ``embeds`` ``(S, n, C)``.

    Returns:
        ``(S, keep)`` positions in the order they were picked.
    """
    spans, n, _ = embeds.shape
    unit = F.normalize(embeds.float(), dim=-1)  # (S, n, C)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (S, n, n) cosine distance: the one matmul, 2 n^2 C per span
    eye = torch.eye(n, dtype=torch.bool, device=embeds.device)
    nearest = distance.masked_fill(eye, float("inf")).amin(dim=1)  # (S, n) distance to the nearest other token
    rows = torch.arange(spans, device=embeds.device)
    picked = nearest.argmax(dim=1)  # (S,) the most isolated token starts the set
    taken = torch.zeros(spans, n, dtype=torch.bool, device=embeds.device)
    taken[rows, picked] = True
    to_set = distance[rows, picked]  # (S, n) minimum distance of every token to the kept set
    order = [picked]
    for _ in range(keep - 1):
        picked = to_set.masked_fill(taken, float("-inf")).argmax(dim=1)  # (S,) farthest from the kept set
        taken[rows, picked] = True
        to_set = torch.minimum(to_set, distance[rows, picked])
        order.append(picked)
    return torch.stack(order, dim=1)


class DivPrune(PreLLMMethod):
    """Keep each image's most diverse visual tokens (greedy max-min cosine distance), before the LLM."""

    name = "divprune"
    identity = {"keep": 1.0}
    example = {"keep": 0.25}

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        picked = max_min_diverse(ctx.embeds, ctx.keep)  # (S, K)
        chosen = torch.zeros(ctx.embeds.shape[:2], device=ctx.embeds.device).scatter_(1, picked, 1.0)  # (S, n)
        return ctx.select(chosen)  # exactly K ones per span: the picked set, in spatial order

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        return 2.0 * tokens * tokens * channels  # the (n x C) @ (C x n) cosine Gram matrix


register_method("divprune", DivPruneConfig, DivPrune)

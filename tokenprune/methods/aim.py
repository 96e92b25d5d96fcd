"""``aim``: AIM (Zhong et al., 2024), "Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning".

a) Before the LLM: each image's visual embeddings (after the projector) are merged iteratively by cosine
   similarity (ToMe's bipartite soft matching, at most half per round, size-weighted averages) until
   ``merge_keep`` of them are left; merged tokens stay in spatial order.
b) Inside the LLM: all (merged) visual tokens are kept up to layer ``prune_start * depth``, then linearly
   fewer, none from layer ``prune_end * depth`` on. A visual token's importance is the attention it receives
   from the text tokens that follow the first image, averaged over heads and over those text tokens
   (computed from the layer's own rotary-embedded queries and keys: a ``T x N`` product per head, so the
   model keeps its fused attention). Tokens are removed for real.

AIM's reference code merges with an unweighted mean and ranks by a PageRank over the full attention map
under eager attention; this version keeps the paper's two stages with size-weighted merging and the cheaper
text-to-visual attention rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.core.merge import bipartite_soft_matching, reduce_tokens
from tokenprune.methods.vlm import (
    DecoderLayerContext,
    PreLLMContext,
    SpanReduction,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
    check_fraction,
    count,
)
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class AIMConfig(VLMReductionConfig):
    """AIM (Zhong et al., 2024): merge visual tokens before the LLM, then prune them progressively inside it.

    Attributes:
        merge_keep: Fraction of each image's visual tokens left after iterative merging by embedding
            similarity before the LLM, in (0, 1] (1 = no merging); default 0.25. Give ``merge_keep`` or
            ``flops``, not both (with ``flops`` it is solved, the pruning schedule stays as given).
        prune_start: Layer fraction up to which every (merged) visual token is kept.
        prune_end: Layer fraction from which no visual token is left; linear in between.
        merge_positions: ``"compact"`` (AIM: the LLM sees the prompt as if each image had fewer placeholders,
            positions are consecutive) or ``"original"`` (each merged token keeps the position of the token
            it is stored at; later text keeps its original positions).
    """

    merge_keep: float | None = None
    prune_start: float = 0.5
    prune_end: float = 0.75
    merge_positions: str = "compact"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ratio_or_flops("merge_keep", 0.25, low_open=True)
        self.prune_start = check_fraction("prune_start", self.prune_start, False)
        self.prune_end = check_fraction("prune_end", self.prune_end, False)
        if self.prune_end < self.prune_start:
            raise ValueError(f"prune_end ({self.prune_end}) must be >= prune_start ({self.prune_start})")
        if self.merge_positions not in ("compact", "original"):
            raise ValueError(f"merge_positions must be 'compact' or 'original', got {self.merge_positions!r}")


def aim_fractions(depth: int, prune_start: float, prune_end: float) -> tuple[float, ...]:
    """Fraction of the merged visual tokens entering each of ``depth`` layers.

    With ``S = round(prune_start * depth)`` and ``E = round(prune_end * depth)``: 1 up to layer ``S``,
    ``(E - layer) / (E - S)`` in between, 0 from layer ``E`` on (a cliff at ``E`` when ``S == E``). Layer 0
    always sees every token: its attention scores the first pruning.
    """
    start, end = count(prune_start, depth), count(prune_end, depth)
    fractions = []
    for layer in range(depth):
        if layer == 0:
            fractions.append(1.0)
        elif start == end:
            fractions.append(1.0 if layer < end else 0.0)
        else:
            fractions.append(min(1.0, max(0.0, (end - layer) / (end - start))))
    return tuple(fractions)


class AIM(VisualTokenMethod):
    """Merge before the LLM, then prune by text-to-visual attention, progressively."""

    name = "aim"
    identity = {"merge_keep": 1.0, "prune_start": 1.0, "prune_end": 1.0}
    example = {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75}
    query_rows = "text"
    budget_parameter = "merge_keep"

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        merge_keep = self.config.merge_keep if value is None else value
        return VisualPlan(merge_keep, aim_fractions(depth, self.config.prune_start, self.config.prune_end))

    def candidates(self, visual: int) -> list[float]:
        return [c / visual for c in range(1, visual + 1)] if visual else [1.0]

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        x, keep = ctx.embeds, ctx.keep
        state = TokenState.start(x, 0, trace_source=True)  # source: (S, K, n) which tokens each one holds
        while x.shape[1] > keep:
            r = min(x.shape[1] - keep, x.shape[1] // 2)
            src, dst, kept = bipartite_soft_matching(x, r, 0)  # cosine similarity of the embeddings
            x = reduce_tokens(x, state, kept, src, dst)  # size-weighted average, order preserved
        return SpanReduction(state.index, x, state.size.squeeze(-1), state.source.argmax(dim=1))

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        flops = 0.0
        while tokens > keep:  # the (Na x C) @ (C x Nb) similarity of every round
            flops += 2.0 * ((tokens + 1) // 2) * (tokens // 2) * channels
            tokens -= min(tokens - keep, tokens // 2)
        return flops

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        rows, row_valid = ctx.text_rows()  # (B, T): text tokens that can see an image
        probs = ctx.attention_rows(rows, row_valid)  # (B, T, N), zero for invalid rows
        weight = row_valid.sum(dim=1, keepdim=True).clamp(min=1).to(probs.dtype)  # (B, 1)
        return probs.sum(dim=1) / weight


register_method("aim", AIMConfig, AIM)

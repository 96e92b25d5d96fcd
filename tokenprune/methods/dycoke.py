"""``dycoke``: DyCoke (Tao et al., CVPR 2025), "DyCoke: Dynamic Compression of Tokens for Fast Video LLMs".

DyCoke has two stages, both here. **Stage 1, token temporal merging (TTM)**: before the LLM, each
video's frames are grouped in windows of ``window`` frames (the paper's 4); the first frame of a window (its
pivot) keeps every token, and every other frame keeps the ``1 - ratio`` fraction of its tokens that are *least*
cosine-similar to the token at the same place in its reference frame (the temporally redundant ones are dropped).
The reference frame is the reference code's: in a window of 4, frame 1 and frame 2 are compared with frame 0 and
frame 3 with frame 2 (the original frame 2, before its own pruning); for any window, frame ``i`` of the window is
compared with frame ``i & (i - 1)`` (``i`` with its lowest set bit cleared), which is that rule for 4.

**Stage 2, dynamic KV-cache pruning during decoding** (:mod:`tokenprune.adapters.vlm.decode_selection`): at every
one-token decode step the new token's attention at layer ``kv_layer - 1`` (head-averaged) ranks each video's
cached entries; layers ``kv_layer`` on attend to the top ``1 - kv_ratio`` of them (plus every text, image and
generated token), reselected only where the attention's cosine similarity to the previous step's falls below
``kv_refresh``. Skipped entries stay in the cache, so a later step may select them again (the reference:
``dycoke_l=3``, ``dycoke_p=0.7``, threshold 0.9).

Kept from the reference code (github.com/KD-TAO/DyCoke, ``dycole_ttm``): the per-token cosine similarity to
the same token of the reference frame, the reference frames of a window of 4, a fixed count kept per
non-pivot frame (``ratio``; the reference's ``dycoke_k=0.7`` prunes 70%), tokens dropped (not averaged: the
reference's "merging" keeps the least similar tokens and drops the rest). Changed: every window is pruned,
the last one and an odd last frame included (the reference skips the last window's frame 2, drops an odd last
frame, and ranks frame ``2j + 1`` by the similarity of the previous pair: ``similarities[(i - 2) // 2]``); the
count is rounded half up (``count``), not floored; kept tokens stay in their place (each keeps its own 3-axis
M-RoPE position on Qwen-VL) instead of being concatenated; a batch runs together.

Stage 2, kept from the reference (``PrunableDynamicCache.dycoke_pruning`` / ``update_cache``): the ranking by the
last query row of layer ``dycoke_l - 1`` averaged over heads, the top ``1 - dycoke_p`` visual entries attended by
the later layers, the cosine test against the previous step's attention, every entry kept in the cache.
Changed: the attention row is recomputed for the new token only from its rotary-embedded query and the cached
keys, so every layer keeps SDPA (the reference needs eager attention's weights); skipped entries are masked,
not gathered out; a step whose attention stays similar keeps the previous selection (the reference's index list
is reset before layer ``dycoke_l`` at every step, so such a step attends to every entry); the ranked entries are
each video's (the reference: the one image-token span), counts rounded half up; per-sample selections in a
batch, beams reorder them.

Inputs: videos of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision (the reference's model): their
adapters lay each video out as one span with its frame count (``span_frames``; LLaVA-OneVision's video newline
stays, structural). An image is a single frame: it has no temporal redundancy and keeps every token (a prompt
with images only keeps all its tokens). Other families do not lay out video frames: reducing options are refused
there.

``flops=`` (a fraction of the LLM prefill FLOPs) is solved per video prompt for ``ratio``; a prompt with images
only cannot meet a budget (nothing there to drop) and is refused, naming the valid budgets. Stage 2 changes no
prefill FLOPs (it saves attention at decode steps).

Paper (arXiv 2411.15024, abstract): "achieving 1.5X inference speedup, 1.4X memory reduction against the
baseline VLLM, while still improving the performance, with no training" (its main baseline: LLaVA-OneVision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tokenprune.methods.vlm import (
    DecodeSelection,
    PreLLMContext,
    SpanReduction,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
    check_fraction,
    count,
)
from tokenprune.registry import register_method

DEFAULT_RATIO = 0.7  # the reference's dycoke_k: 70% of every non-pivot frame's tokens pruned
DEFAULT_KV_RATIO = 0.7  # the reference's dycoke_p: decode steps skip 70% of the cached video entries


@dataclass
class DyCokeConfig(VLMReductionConfig):
    """DyCoke (Tao et al., CVPR 2025), stage 1: drop tokens of video frames that repeat their reference frame.

    Attributes:
        ratio: Fraction of the tokens of every non-pivot frame dropped, in [0, 1] (0: nothing; 1: only the
            pivot frames stay); default 0.7 (the reference's). Give ``ratio`` or ``flops``.
        window: Frames per window, an int >= 1; the first frame of each window keeps all its tokens (1: every
            frame is a pivot, nothing is dropped). Default 4 (the paper's).
        kv_ratio: Stage 2: fraction of each video's cached entries a decode step skips, in [0, 1] (0: stage 2
            off); default 0.7 (the reference's ``dycoke_p``).
        kv_layer: Stage 2: the first layer that attends to the selection, ranked by the new token's attention at
            the layer before (the reference's ``dycoke_l``). On a hybrid decoder (Qwen3.5) the ranking layer is the
            first softmax-attention layer at or after ``kv_layer - 1``. Default None: 3, as the reference, or in a
            decoder too shallow for that, its last softmax-attention layer but one.
        kv_refresh: Stage 2: a step reselects where its attention's cosine similarity to the previous step's
            is below this; elsewhere the previous selection stays. Default 0.9 (the reference's).
    """

    ratio: float | None = None
    window: int = 4
    kv_ratio: float = DEFAULT_KV_RATIO
    kv_layer: int | None = None
    kv_refresh: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ratio_or_flops("ratio", DEFAULT_RATIO)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1 (frames per window), got {self.window!r}")
        self.kv_ratio = check_fraction("kv_ratio", self.kv_ratio, False)
        if self.kv_layer is not None and (
            isinstance(self.kv_layer, bool) or not isinstance(self.kv_layer, int) or self.kv_layer < 1
        ):
            raise ValueError(
                f"kv_layer must be an int >= 1 (the first layer decoding attends to the selection "
                f"from), got {self.kv_layer!r}"
            )
        if isinstance(self.kv_refresh, bool) or not isinstance(self.kv_refresh, (int, float)):
            raise TypeError(f"kv_refresh must be a number (cosine similarity threshold), got {self.kv_refresh!r}")
        self.kv_refresh = float(self.kv_refresh)


def reference_frames(frames: int, window: int) -> torch.Tensor:
    """``(frames,)`` the frame each frame is compared with: itself for a pivot (a window's first frame)."""
    index = torch.arange(frames)
    local = index % window
    return index - local + (local & (local - 1))  # a pivot (local 0): 0 & -1 = 0, itself


def pivot_count(frames: int, window: int) -> int:
    """Pivot frames (kept whole) of a video of ``frames`` frames."""
    return math.ceil(frames / window)


class DyCoke(VisualTokenMethod):
    """Stage 1 of DyCoke: per window of frames, drop the tokens most similar to their reference frame's."""

    name = "dycoke"
    identity = {"ratio": 0.0, "kv_ratio": 0.0}
    # Images keep every token, and the shared matrix asks an example to reduce its image prompts: the example
    # is the identity there; tests/test_dycoke.py runs the reducing checks on videos.
    example = {"ratio": 0.0, "kv_ratio": 0.0}
    query_rows: ClassVar[str] = "none"
    budget_parameter: ClassVar[str] = "ratio"
    #: Asks the adapter for one span per video (with its frame count) instead of one per frame.
    whole_videos: ClassVar[bool] = True

    def __init__(self, config: DyCokeConfig) -> None:
        super().__init__(config)
        self._adapter: Any = None
        self._layouts: dict[int, int] = {}  # under a budget: the frames of each span size seen (plans are cached)

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        reduces = self.config.flops is not None or self.config.ratio > 0
        if reduces and not isinstance(getattr(adapter, "span_frames", None), dict):
            raise NotImplementedError(
                "dycoke reduces video frames of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision; "
                f"{type(adapter.model).__name__}'s adapter does not lay out video frames (ratio=0 runs it unreduced)"
            )
        self._adapter = adapter
        self._ranking_layer = self.ranking_layer(adapter)

    def ranking_layer(self, adapter: Any) -> int | None:
        """Stage 2's ranking layer on ``adapter``'s decoder: the first softmax-attention layer at or after
        ``kv_layer - 1`` that has a softmax-attention layer after it (None: stage 2 cannot run there)."""
        layers = [getattr(layer, "base_layer", layer) for layer in adapter.language_model.layers]
        softmax = [i for i, layer in enumerate(layers) if hasattr(layer, adapter.decoder.attn)]
        start = (3 if self.config.kv_layer is None else self.config.kv_layer) - 1
        ranking = next((i for i in softmax if i >= start and i < softmax[-1]), None)
        if ranking is None and self.config.kv_layer is None and len(softmax) > 1:
            ranking = softmax[-2]  # a decoder shallower than the reference's layer 3: its last possible one
        if ranking is None and self.config.kv_ratio > 0:
            top = softmax[-2] + 1 if len(softmax) > 1 else 0
            raise ValueError(
                f"dycoke kv_layer={self.config.kv_layer} leaves no softmax-attention layer to rank from with one "
                f"after it in this {len(layers)}-layer decoder; valid kv_layer values are 1..{top}"
            )
        return ranking

    def decode_selection(self) -> DecodeSelection | None:
        if self.config.kv_ratio <= 0.0:
            return None
        ranking = getattr(self, "_ranking_layer", None)
        if ranking is None:
            raise RuntimeError("dycoke: stage 2 runs on a model this method was checked against (check_model)")
        return DecodeSelection(ranking, 1.0 - self.config.kv_ratio, self.config.kv_refresh)

    def decode_eligible(self, tokens: int) -> bool:
        return self.frames(tokens) > 1  # videos; an image keeps every entry at decode steps too

    def frames(self, tokens: int) -> int:
        """Frames of the last call's spans of ``tokens`` tokens (1: an image, or no video layout).

        Raises:
            ValueError: Spans of that size with different frame counts in one call, or (under ``flops=``) a
                span size seen before with another frame count.
        """
        layout = getattr(self._adapter, "span_frames", None) or {}
        counts = layout.get(tokens, {1})
        if len(counts) > 1:
            raise ValueError(
                f"dycoke: this call has visual spans of {tokens} tokens with different frame counts "
                f"{sorted(counts)} (e.g. an image and a video of equal size); run them in separate calls"
            )
        (frames,) = counts
        if self.config.flops is not None and self._layouts.setdefault(tokens, frames) != frames:
            raise ValueError(
                f"dycoke: under flops= a span of {tokens} tokens had {self._layouts[tokens]} frames before and "
                f"{frames} now (budgets are solved once per prompt layout); apply the method again for these"
            )
        return frames

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        ratio = self.config.ratio if value is None else value
        if self.config.window == 1:  # every frame a pivot: nothing to drop, the identity plan (bit-exact)
            ratio = 0.0
        return VisualPlan(1.0 - ratio, (1.0,) * depth)  # merge_keep: the fraction each non-pivot frame keeps

    def candidates(self, visual: int) -> list[float]:
        # Ascending cost: from dropping every non-pivot token (ratio 1) down to dropping none (ratio 0).
        return [1.0 - c / visual for c in range(visual + 1)] if visual else [0.0]

    def per_frame(self, tokens: int) -> tuple[int, int, int]:
        """``(frames, tokens per frame, pivot frames)`` of a span of ``tokens`` tokens."""
        frames = self.frames(tokens)
        if tokens % frames:
            raise ValueError(f"dycoke: a span of {tokens} tokens cannot hold {frames} frames of equal size")
        return frames, tokens // frames, pivot_count(frames, self.config.window)

    def merged_count(self, tokens: int, merge_keep: float) -> int:
        frames, size, pivots = self.per_frame(tokens)
        if merge_keep >= 1.0 or frames == pivots:
            return tokens
        return pivots * size + (frames - pivots) * count(merge_keep, size)

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        spans, n, channels = ctx.embeds.shape
        frames, size, pivots = self.per_frame(n)
        kept = (ctx.keep - pivots * size) // (frames - pivots)  # tokens each non-pivot frame keeps
        x = ctx.embeds.float().view(spans, frames, size, channels)
        unit = F.normalize(x, dim=-1)  # (S, T, m, C)
        reference = reference_frames(frames, self.config.window).to(x.device)  # (T,)
        similarity = (unit * unit[:, reference]).sum(dim=-1)  # (S, T, m) cosine to the reference frame's token
        pivot = reference == torch.arange(frames, device=x.device)  # (T,)
        chosen = torch.zeros(spans, frames, size, device=x.device)
        chosen[:, pivot] = 1.0
        if kept > 0:
            rest = similarity[:, ~pivot].topk(kept, dim=-1, largest=False).indices  # (S, T - P, k) least similar
            chosen[:, ~pivot] = torch.zeros_like(similarity[:, ~pivot]).scatter_(-1, rest, 1.0)
        return ctx.select(chosen.view(spans, n))  # exactly keep ones per span: kept in place, in order

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        return 0.0  # per-token cosine similarities (elementwise, 2 C m per compared frame): no matmul


register_method("dycoke", DyCokeConfig, DyCoke)

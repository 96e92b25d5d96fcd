"""``pyramiddrop``: PyramidDrop (Xing et al., CVPR 2025), "Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction".

The LLM is split into stages at a few depths (the paper's default for 32 layers: after layers 8, 16 and 24, i.e.
at 1/4, 1/2 and 3/4 of the depth); at the end of each stage, the visual tokens that remain are ranked by the
attention the last instruction token pays them and a ratio ``keep`` (the paper's lambda, default 0.5) of them is
kept, so stage ``s`` holds ``lambda ** s`` of the visual tokens: a pyramid. Text is never removed.

Kept from the reference code (``Cooperx521/PyramidDrop``, ``modeling_llama_pdrop.py``): the stage boundaries
(``layer_list``; ``layers=(8, 16, 24)`` here, counted as there: a boundary ``b`` means layers ``0 .. b-1`` hold
the stage's tokens, layer ``b`` on the next stage's), the per-stage ratios of the *original* visual count
(``image_token_ratio_list`` [0.5, 0.25, 0.125] is ``ratios=`` here, or ``lambda ** s`` from ``keep``), the
ranking query: at inference the last token of the prompt (the reference's ``prompt_len + image_tokens - 1``, the
last instruction token; in training the reference uses the token before each answer, not done here), attention
averaged over heads, top-k, kept tokens in their original order.

Changed: the ranking attention is that of the layer that ends the stage (its own rotary-embedded queries and
keys: one ``(1 x D) @ (D x N)`` product per head, the layer itself stays on SDPA); the reference re-projects the
stage's output through the *next* layer's input norm and q/k projections (an extra ``N x C x D`` key projection)
and drops before that layer. Tokens are removed for real (later layers and their KV cache hold only the kept
ones; the reference shortens the sequence too, but renumbers positions and pads the batch on the right); rotary
positions stay the original ones. Counts round half up (``count``) where the reference floors. All visual tokens
of a prompt (several images, video frames) are ranked together; the reference handles one image per prompt.
Batches of any padding, every family, ``flops=`` budgets (solved for lambda).

Paper (abstract, arXiv 2410.17247): "PyramidDrop can achieve a 40% training time and 55% inference FLOPs
acceleration of LLaVA-NeXT with comparable performance", and as a training-free plug-in "better performance and
lower inference cost than counterparts".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from tokenprune.methods.vlm import (
    DecoderLayerContext,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
    check_fraction,
    count,
)
from tokenprune.registry import register_method

#: The paper's stage boundaries as fractions of the depth (after layers 8, 16, 24 of 32).
DEFAULT_STAGES = (0.25, 0.5, 0.75)


def _sequence(name: str, value: object) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name} must be a non-empty list of numbers, got {value!r}")
    return tuple(value)


@dataclass
class PyramidDropConfig(VLMReductionConfig):
    """PyramidDrop (Xing et al., CVPR 2025): at each stage boundary keep ``keep`` of the visual tokens left.

    Attributes:
        stages: Stage boundaries as fractions of the LLM depth, strictly increasing in (0, 1); boundary ``f`` is
            after layer ``round(f * depth)`` (half up). Default (0.25, 0.5, 0.75): after layers 8/16/24 of 32.
        layers: Instead of ``stages``: the boundaries as layer counts, strictly increasing, each in
            ``[1, depth - 1]`` (the reference's ``layer_list``, e.g. ``(8, 16, 24)``): layers ``0 .. b-1`` see
            the stage's tokens, layer ``b`` on the next stage's.
        keep: Ratio lambda in [0, 1] of the remaining visual tokens kept at each boundary (stage ``s`` holds
            ``keep ** s`` of them); default 0.5.
        ratios: Instead of ``keep``: the fraction of the visual tokens held after each boundary, one per
            boundary, non-increasing, in [0, 1] (the reference's ``image_token_ratio_list``, e.g.
            ``(0.5, 0.25, 0.125)``). Give one of ``keep``, ``ratios`` or ``flops``.
    """

    stages: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None
    keep: float | None = None
    ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stages is not None and self.layers is not None:
            raise ValueError("give either stages (layer fractions) or layers (layer counts), not both")
        if self.layers is not None:
            self.layers = _sequence("layers", self.layers)
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.layers):
                raise ValueError(f"layers must be ints >= 1 (layers before each boundary), got {self.layers!r}")
            if any(b >= c for b, c in pairwise(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers!r}")
        else:
            stages = DEFAULT_STAGES if self.stages is None else _sequence("stages", self.stages)
            stages = tuple(check_fraction("stages", f, True) for f in stages)
            if stages[-1] >= 1.0 or any(f >= g for f, g in pairwise(stages)):
                raise ValueError(f"stages must be strictly increasing fractions in (0, 1), got {stages!r}")
            self.stages = stages
        given = [name for name in ("keep", "ratios", "flops") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep, ratios or flops, not {' and '.join(given)}")
        if self.ratios is not None:
            self.ratios = tuple(check_fraction("ratios", r, False) for r in _sequence("ratios", self.ratios))
            if any(r < s for r, s in pairwise(self.ratios)):
                raise ValueError(f"ratios must be non-increasing (tokens are never added back), got {self.ratios!r}")
            boundaries = len(self.layers if self.layers is not None else self.stages)
            if len(self.ratios) != boundaries:
                raise ValueError(f"ratios needs one entry per stage boundary ({boundaries}), got {self.ratios!r}")
        else:
            self.ratio_or_flops("keep", 0.5)


class PyramidDrop(VisualTokenMethod):
    """At each stage boundary, the top ``keep`` of the remaining visual tokens by the last token's attention."""

    name = "pyramiddrop"
    identity = {"keep": 1.0}
    example = {"keep": 0.5}
    query_rows = "last"
    budget_parameter = "keep"

    def boundaries(self, depth: int) -> list[int]:
        """Layers after which each stage ends (``b``: layers ``0 .. b-1`` hold the stage) for ``depth`` layers."""
        if self.config.layers is not None:
            return list(self.config.layers)
        return [count(f, depth) for f in self.config.stages]

    def validate(self, depth: int) -> None:
        bounds = self.boundaries(depth)
        if bounds[0] < 1 or bounds[-1] > depth - 1 or any(b >= c for b, c in pairwise(bounds)):
            if self.config.layers is not None:
                given = f"layers={list(self.config.layers)}"
            else:
                given = f"stages={list(self.config.stages)} (after layers {bounds})"
            raise ValueError(
                f"pyramiddrop {given} does not fit a language model of {depth} layers: boundaries must be "
                f"strictly increasing layers in [1, {depth - 1}]; pass fewer stages or layers= explicitly"
            )

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        bounds = self.boundaries(depth)
        if value is None and self.config.ratios is not None:
            held = (1.0, *self.config.ratios)
        else:
            keep = self.config.keep if value is None else value
            held = tuple(keep**stage for stage in range(len(bounds) + 1))
        # A layer's stage: how many boundaries lie at or before it.
        return VisualPlan(1.0, tuple(held[sum(b <= layer for b in bounds)] for layer in range(depth)))

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        rows, row_valid = ctx.last_rows()  # (B, 1): the last prompt token, the reference's last instruction token
        return ctx.attention_rows(rows, row_valid)[:, 0]  # (B, N)


register_method("pyramiddrop", PyramidDropConfig, PyramidDrop)

"""Configs of the vision-language methods (``fastv``, ``aim``) and what such a method is.

The ViT methods reduce a token sequence layer by layer through ``Method.reduce(x, state, r, ctx)``. That
interface does not fit a language model: visual tokens are a per-sample span inside text that is never
touched, the number of visual tokens is only known per prompt, and the adapter (not the method) must slice
masks, rotary embeddings and the KV cache. A :class:`VisualTokenMethod` therefore only *decides*:

* :meth:`VisualTokenMethod.plan`: how many visual tokens survive merging before the LLM and which fraction
  of them enters each LLM layer (a :class:`VisualPlan`);
* :meth:`VisualTokenMethod.merge`: how one image's visual embeddings are merged before the LLM (if at all);
* :meth:`VisualTokenMethod.importance`: how important each visual token is at a pruning layer, from the
  layer's attention rows the adapter computes on request (``ctx.attention_rows``), so the model's fused
  attention (SDPA) stays on.

The adapter (``tokenprune.adapters.hf_decoder``) does everything else: spans, per-sample top-k, real removal,
positions, masks, cache bookkeeping and ``generate()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tokenprune.config import ConfigOptions
from tokenprune.methods.base import Method


def count(fraction: float, total: int) -> int:
    """``fraction`` of ``total`` tokens, rounded half up, clamped to ``[0, total]``."""
    return min(total, max(0, math.floor(fraction * total + 0.5 + 1e-9)))


def _check_fraction(name: str, value: Any, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not ((0.0 < value) if low_open else (0.0 <= value)) or value > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


@dataclass
class VLMReductionConfig(ConfigOptions):
    """Options shared by the vision-language methods.

    There is no ``r``/``input_size``/``trace_source``: visual token counts are read from each prompt.

    Attributes:
        flops: Instead of the method's own ratio: target LLM *prefill* FLOPs as a fraction of the unreduced
            prefill (vision tower, projector and LM head excluded), in (0, 1]. Solved per prompt (its text and
            visual token counts), so every sample of a batch gets the budget.
    """

    flops: float | None = None

    def __post_init__(self) -> None:
        if self.flops is not None:
            self.flops = _check_fraction("flops (fraction of the unreduced LLM prefill FLOPs)", self.flops, True)



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
        if self.keep is not None:
            if self.flops is not None:
                raise ValueError("give either keep or flops, not both")
            self.keep = _check_fraction("keep", self.keep, False)
        elif self.flops is None:
            self.keep = 0.5


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
        if self.merge_keep is not None:
            if self.flops is not None:
                raise ValueError("give either merge_keep or flops, not both")
            self.merge_keep = _check_fraction("merge_keep", self.merge_keep, True)
        elif self.flops is None:
            self.merge_keep = 0.25
        self.prune_start = _check_fraction("prune_start", self.prune_start, False)
        self.prune_end = _check_fraction("prune_end", self.prune_end, False)
        if self.prune_end < self.prune_start:
            raise ValueError(f"prune_end ({self.prune_end}) must be >= prune_start ({self.prune_start})")
        if self.merge_positions not in ("compact", "original"):
            raise ValueError(f"merge_positions must be 'compact' or 'original', got {self.merge_positions!r}")


@dataclass(frozen=True)
class VisualPlan:
    """What a method does to one prompt's visual tokens.

    Attributes:
        merge_keep: Fraction of each image's tokens left after merging before the LLM (1.0: no merging).
        fractions: One entry per LLM layer: fraction of the (merged) visual tokens entering that layer.
            ``fractions[0]`` is 1.0 (the first layer's attention is what the first pruning scores with) and
            the entries never increase.
    """

    merge_keep: float
    fractions: tuple[float, ...]

    @property
    def is_identity(self) -> bool:
        """True when nothing is merged or pruned."""
        return self.merge_keep >= 1.0 and all(f >= 1.0 for f in self.fractions)

    def visual_counts(self, merged: int) -> list[int]:
        """Visual tokens entering each layer for a prompt with ``merged`` visual tokens after merging."""
        return [count(f, merged) for f in self.fractions]


class VisualTokenMethod(Method):
    """Base class of methods that reduce the visual tokens of a vision-language model.

    Subclasses implement :meth:`plan_for`, :meth:`importance` and, if they merge, :meth:`merge`. The adapter
    calls them; it never lets a method touch masks, positions or caches.
    """

    #: Which query rows :meth:`importance` reads (for FLOPs accounting): ``"last"`` or ``"text"``.
    query_rows: ClassVar[str] = "last"
    #: The free parameter a FLOPs budget is solved for (a config field name).
    budget_parameter: ClassVar[str] = ""

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        """The plan for an LLM of ``depth`` layers; ``value`` overrides :attr:`budget_parameter`."""
        raise NotImplementedError

    def validate(self, depth: int) -> None:
        """Raise if the config cannot work with an LLM of ``depth`` layers."""

    def check_model(self, adapter: Any) -> None:
        self.validate(adapter.depth)

    def candidates(self, visual: int) -> list[float]:
        """Values of :attr:`budget_parameter` a FLOPs budget may pick for a prompt with ``visual`` tokens."""
        return [c / visual for c in range(visual + 1)] if visual else [1.0]

    def merged_count(self, tokens: int, merge_keep: float) -> int:
        """Tokens one image of ``tokens`` visual tokens keeps after merging (at least one if it merges)."""
        return tokens if merge_keep >= 1.0 else max(1, count(merge_keep, tokens))

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        """Matmul FLOPs (2 x MAC) of :meth:`merge` on one image of ``tokens`` down to ``keep`` tokens."""
        return 0.0

    def merge(self, x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge each of ``S`` spans of visual embeddings ``x`` ``(S, n, C)`` down to ``keep`` tokens.

        Returns:
            ``(index, merged, size)``: ``(S, keep)`` ascending positions in the span each merged token is
            stored at, ``(S, keep, C)`` merged embeddings and ``(S, keep)`` original tokens each one holds.
        """
        raise NotImplementedError(f"method {self.name!r} does not merge")

    def importance(self, ctx: Any) -> torch.Tensor:
        """``(B, N)`` importance of every current token at a pruning layer (only visual entries are used).

        Args:
            ctx: The layer's ``tokenprune.adapters.hf_decoder.DecoderLayerContext``.
        """
        raise NotImplementedError

    def max_removable(self, reducible: int) -> int:
        return reducible

    def reduce(self, x, state, r, ctx):  # pragma: no cover - the ViT interface is not used by VLM adapters
        raise TypeError(f"method {self.name!r} reduces visual tokens of a vision-language model only")

    def solve_budget(self, fraction: float, depth: int, visual: int, cost: Callable[[VisualPlan], float]) -> VisualPlan:
        """The plan whose ``cost`` is closest to ``fraction`` of the unreduced cost (ties: fewer removed).

        ``cost`` grows with the budget parameter, so the candidates are bisected.

        Raises:
            ValueError: The budget is below what the method reaches.
        """
        values = self.candidates(visual)
        identity = VisualPlan(1.0, (1.0,) * depth)
        full = cost(identity)
        if fraction >= 1.0 or full <= 0:
            return identity

        def relative(i: int) -> float:
            return cost(self.plan_for(depth, values[i])) / full

        floor = relative(0)
        if floor > fraction + 1e-12:
            raise ValueError(
                f"flops budget {fraction} is below what {self.name!r} reaches on this prompt "
                f"({visual} visual tokens; lowest: {floor:.3f}); valid budgets are in [{floor:.3f}, 1]"
            )
        low, high = 0, len(values) - 1  # relative(low) <= fraction < relative(high) (or high is the top)
        while high - low > 1:
            mid = (low + high) // 2
            if relative(mid) <= fraction:
                low = mid
            else:
                high = mid
        best = min((low, high), key=lambda i: (abs(relative(i) - fraction), -i))
        return self.plan_for(depth, values[best])

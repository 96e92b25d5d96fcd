"""``dtop``: Dynamic Token Pruning for semantic segmentation (Tang et al., ICCV 2023), early exit per token.

At each stage boundary of a :class:`tokenprune.zoo.camvid.ViTSegmenter` (``exit_after``), the boundary's
auxiliary head grades every token still in the sequence. Tokens whose top class probability reaches
``threshold`` exit: that aux prediction is their final one and they leave the sequence for all later
blocks (real removal). The ``keep_top_k`` most confident tokens of each predicted class stay, so later
blocks keep context of every class. The final head predicts the tokens that never exit, and the output
map is reassembled in original token positions. This module holds the options and the exit rule
(:func:`tokenprune.core.early_exit.select_exits`); the segmenter adapter
(:mod:`tokenprune.adapters.dense.segmenter`) runs the blocks, owns padding and masks, and reassembles the map.

    patch = tokenprune.apply(segmenter, "dtop", threshold=0.95, keep_top_k=5)
    logits = segmenter(images)              # (B, K, h, w), same shape as without dtop
    patch.state.exit_stage                  # (B, h*w): 0.. = exited at exit_after[s], S = final head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.early_exit import select_exits
from tokenprune.methods.dense import EarlyExitMethod, ExitContext
from tokenprune.registry import register_method


@dataclass
class DToPConfig(ReductionConfig):
    """DToP early exit.

    Attributes:
        threshold: A token exits at a stage boundary when its aux head's top class probability is at
            least this; any number > 0 (values above 1 disable exits: the exact unpruned prediction), or a
            list with one such number per exit stage (e.g. stricter at the earliest, weakest head).
        keep_top_k: Per image and class, the k most confident live tokens never exit (an int >= 0).
    """

    threshold: float | list[float] = 0.95
    keep_top_k: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if (isinstance(self.r, int) and self.r) or (isinstance(self.r, list) and any(self.r)):
            raise ValueError(
                "method 'dtop' has no per-layer schedule r: tokens exit by confidence; set threshold (> 0) "
                "and keep_top_k (>= 0) instead"
            )
        if self.flops is not None:
            raise ValueError(
                "method 'dtop' takes no FLOPs budget: its cost follows from threshold (> 0) and keep_top_k "
                "(>= 0); sweep threshold to trade FLOPs for accuracy"
            )
        values = self.threshold if isinstance(self.threshold, (list, tuple)) else [self.threshold]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    "threshold must be a number > 0 (max class probability to exit) or a list of them, one per "
                    f"exit stage; got {self.threshold!r}"
                )
            if not value > 0 or value != value:
                raise ValueError(
                    f"threshold must be > 0 (max class probability to exit; > 1 disables exits), got {self.threshold}"
                )
        if not values:
            raise ValueError("threshold must be a number > 0 or a non-empty list of them (one per exit stage)")
        self.threshold = [float(v) for v in values] if isinstance(self.threshold, (list, tuple)) else float(values[0])
        if isinstance(self.keep_top_k, bool) or not isinstance(self.keep_top_k, int) or self.keep_top_k < 0:
            raise ValueError(
                f"keep_top_k must be an int >= 0 (tokens per class that never exit), got {self.keep_top_k!r}"
            )


class DToP(EarlyExitMethod):
    """Early exit by aux-head confidence; runs only on segmenters with exit heads (the adapter's forward)."""

    name = "dtop"
    identity = {"threshold": 2.0}
    example = {"threshold": 0.6, "keep_top_k": 1}

    def check_model(self, adapter: Any) -> None:
        """One threshold per exit stage of the segmenter, if a list is given."""
        exits = adapter.exit_after
        if isinstance(self.config.threshold, list) and len(self.config.threshold) != len(exits):
            raise ValueError(
                f"threshold list {self.config.threshold} has {len(self.config.threshold)} entries; this segmenter "
                f"has {len(exits)} exit stages (exit_after={exits}): give one number, or one per stage"
            )

    def exits(self, ctx: ExitContext) -> torch.Tensor:
        """Tokens at least ``threshold`` confident exit, except the ``keep_top_k`` most confident per class."""
        threshold = self.config.threshold
        if isinstance(threshold, list):
            threshold = threshold[ctx.stage]
        return select_exits(ctx.logits, ctx.valid, threshold, self.config.keep_top_k)


register_method("dtop", DToPConfig, DToP)

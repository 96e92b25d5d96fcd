"""The dense early-exit contract: at each stage boundary of a segmenter, the method says which tokens exit.

A ``dense`` adapter (:class:`tokenprune.adapters.dense.segmenter.SegmenterAdapter`) given an
:class:`EarlyExitMethod` runs the blocks itself. At every boundary it grades the live tokens with that
boundary's auxiliary head, hands the method an :class:`ExitContext` and removes the tokens :meth:`exits`
returns (their aux prediction is final); at the end it reassembles the map in original token positions. The
adapter owns padding, masks and FLOPs; the method owns only the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenprune.methods.base import LayerContext, Method
from tokenprune.state import TokenState


@dataclass(frozen=True)
class ExitContext:
    """One stage boundary of an early-exit forward.

    Rows are padded (images keep different numbers of live tokens), so ``valid`` marks the real ones.

    Attributes:
        stage: Index of the boundary, ``0 .. num_stages - 1`` (one auxiliary head each).
        num_stages: Stage boundaries of the model.
        blocks: Blocks run before this boundary.
        logits: ``(B, L, K)`` the boundary's aux-head logits of the live patch tokens (prefix tokens excluded).
        valid: ``(B, L)`` bool, True for real tokens, False for padding.
    """

    stage: int
    num_stages: int
    blocks: int
    logits: torch.Tensor
    valid: torch.Tensor


class EarlyExitMethod(Method):
    """Base class of methods that let tokens exit at the stage boundaries of a dense predictor.

    Subclasses implement :meth:`exits`. There is no per-layer schedule: ``r`` stays 0 and the adapter never
    calls :meth:`reduce`.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"dense"})

    def exits(self, ctx: ExitContext) -> torch.Tensor:
        """``(B, L)`` bool: the live tokens that exit at this boundary (a subset of ``ctx.valid``)."""
        raise NotImplementedError

    def max_removable(self, reducible: int) -> int:
        return 0  # tokens exit at the stage boundaries, never by a per-layer schedule

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        raise RuntimeError(
            f"{self.name} does not reduce inside blocks; the dense adapter runs its forward and asks exits()"
        )

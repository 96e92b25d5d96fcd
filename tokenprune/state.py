"""Per-forward token bookkeeping.

One :class:`TokenState` is made fresh at the start of every forward pass (by the adapter, when the first
wrapped layer runs). Methods update it in place as they reduce tokens; after the forward it is readable
through ``patch.state``. Nothing here is global, so a model can run twice, in threads of its own patch, or
under ``torch.compile`` without stale state leaking between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerLog:
    """Token counts of one layer of one forward.

    Attributes:
        layer: Layer index in the model's layer list.
        tokens_in: Tokens the layer's attention saw.
        tokens_out: Tokens that left the layer (and that its MLP saw, for in-layer reduction).
    """

    layer: int
    tokens_in: int
    tokens_out: int


@dataclass
class TokenState:
    """Which original tokens the current sequence stands for.

    Attributes:
        size: ``(B, N, 1)`` number of original tokens each current token represents (float, x's dtype).
        index: ``(B, N)`` one original position per current token, a member of its own source set, so the
            indices are unique; they stay sorted ascending (tokens keep their original spatial order).
        num_original: Token count entering the first reduced layer (prefix tokens included).
        num_protected: Leading prefix tokens (class/register) that are never merged or pruned.
        source: Optional ``(B, N, num_original)`` 0/1 matrix: which original tokens each token holds.
        dropped: ``(B,)`` original tokens dropped outright (pruning without fusion), so that
            ``size.sum() + dropped == num_original`` always holds.
        log: One :class:`LayerLog` per layer run in this forward.
    """

    size: torch.Tensor
    index: torch.Tensor
    num_original: int
    num_protected: int
    source: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    log: list[LayerLog] = field(default_factory=list)

    @classmethod
    def start(cls, x: torch.Tensor, num_protected: int, trace_source: bool = False) -> TokenState:
        """Fresh state for an unreduced sequence ``x`` of shape ``(B, N, C)``."""
        batch, n = x.shape[:2]
        size = torch.ones(batch, n, 1, dtype=x.dtype, device=x.device)
        index = torch.arange(n, device=x.device).expand(batch, n)
        source = None
        if trace_source:
            source = torch.eye(n, dtype=x.dtype, device=x.device).expand(batch, n, n)
        dropped = torch.zeros(batch, dtype=x.dtype, device=x.device)
        return cls(size, index, n, num_protected, source, dropped)

    @property
    def num_tokens(self) -> int:
        """Current sequence length."""
        return self.index.shape[1]

    @property
    def reduced(self) -> bool:
        """True once any token has been merged or dropped in this forward."""
        return self.num_tokens != self.num_original

    def attn_bias(self) -> torch.Tensor | None:
        """Proportional-attention bias ``log(size)`` as an additive mask ``(B, 1, 1, N)``.

        Returns None while nothing is reduced, so the unreduced path stays bit-exact and mask-free.
        """
        if not self.reduced:
            return None
        return self.size.log().transpose(1, 2).unsqueeze(1)

    def tokens_per_layer(self) -> list[tuple[int, int]]:
        """``(tokens_in, tokens_out)`` per logged layer, in order."""
        return [(entry.tokens_in, entry.tokens_out) for entry in self.log]

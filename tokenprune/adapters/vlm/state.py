"""Bookkeeping of one reduced prefill, of the cache it leaves, and of the forward in flight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.methods.vlm import VisualPlan
from tokenprune.state import LayerLog


@dataclass
class DecoderState:
    """Bookkeeping of one reduced prefill (``patch.state`` of a VLM patch). ``B`` samples.

    Attributes:
        index: ``(B, N)`` position in the LLM input (before merging) of each current token; -1 for fill.
        valid: ``(B, N)`` real tokens.
        visual: ``(B, N)`` visual tokens.
        size: ``(B, N)`` input tokens each current token holds (merging), 0 for fill.
        structural: ``(B, N)`` image-layout tokens (kept like text, never query rows).
        num_original: Sequence length entering the LLM.
        plans: One :class:`VisualPlan` per sample.
        targets: ``(depth, B)`` visual tokens planned to enter each layer (also as nested lists, ``targets_list``).
        log: One :class:`LayerLog` per layer (sequence lengths, fill included).
        visual_in: Per layer, ``(B,)`` visual tokens that entered it.
        prunable: ``(B, N)`` tokens the method may remove: ``visual`` itself (the same tensor), or, for a method
            that prunes text (``prunes_text``, e.g. LazyLLM), every real token but structural ones and each
            sample's last. ``targets`` count these.
        prunable_in: Per layer, ``(B,)`` prunable tokens that entered it (``targets``, as tensors).
        index_in: Per layer, the ``index`` of the tokens that entered it.
        scored_rows: Per layer, query rows scored there (0: no pruning).
        spans: Per sample, visual tokens of each span (an image, or a part of one the adapter merges on its own;
            before merging).
        text: Per sample, real tokens the method may not remove (text, or for a ``prunes_text`` method the
            structural tokens and the last one).
        rows: Per sample, query rows its importance reads at a pruning layer.
        generated: Tokens decoded on top of this prefill's cache so far.
        source: ``(B, L)`` for every input position, the input position of the token that stands for it after
            merging before the LLM (itself if kept; a merged group's stored position; -1 if dropped), and after
            recycling inside the LLM (a recycled token's members point to its stored position; a token pruned
            without recycling keeps its own). A token still present at layer ``l`` is one whose source is in
            ``index_in[l]``; ``size`` of a current token counts the input positions whose source it is.
        recycled: ``(depth, B)`` recycled tokens made by the removal before each layer (also as nested lists,
            ``recycled_list``), or None when no plan recycles.
    """

    index: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    size: torch.Tensor
    num_original: int
    plans: list[VisualPlan]
    targets: torch.Tensor
    targets_list: list[list[int]]
    log: list[LayerLog] = field(default_factory=list)
    visual_in: list[torch.Tensor] = field(default_factory=list)
    index_in: list[torch.Tensor] = field(default_factory=list)
    scored_rows: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    generated: int = 0
    merged: bool = False
    structural: torch.Tensor | None = None
    version: int = 0  # removals inside the LLM so far in this forward
    tower_flops: list[float] = field(default_factory=list)  # per sample: computing vision-tower signals
    source: torch.Tensor | None = None
    recycled: torch.Tensor | None = None
    recycled_list: list[list[int]] | None = None
    prunable: torch.Tensor | None = None
    prunable_in: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Current sequence length (fill slots included)."""
        return self.index.shape[1]

    @property
    def reduced(self) -> bool:
        """True once any token was merged before, or removed inside, the LLM."""
        return self.merged or self.version > 0

    def tokens_per_layer(self) -> list[tuple[int, int]]:
        """``(tokens_in, tokens_out)`` per layer (batch sequence lengths)."""
        return [(entry.tokens_in, entry.tokens_out) for entry in self.log]

    def visual_per_layer(self) -> list[list[int]]:
        """Per layer, the visual tokens of each sample that entered it."""
        return [v.tolist() for v in self.visual_in]

    def prunable_per_layer(self) -> list[list[int]]:
        """Per layer, the prunable tokens of each sample that entered it (``targets_list``, as measured)."""
        return [v.tolist() for v in self.prunable_in]


@dataclass
class CacheSession:
    """What a compact KV cache needs at every later forward.

    Attributes:
        key_valid: Per layer, ``(B, K_l)`` validity of the cached keys (and, during a forward, the new ones);
            None while every one is valid.
        key_length: Per layer, ``K_l``.
        compact: Per layer, whether its cache differs from layer 0's (it needs its own mask).
        merged: Whether layer 0's cache differs from the caller's sequence (merging before the LLM).
        shift: ``(B,)`` positions merged away per sample (subtracted from the caller's decode positions).
        external_length: Tokens the caller has fed so far (its view of the sequence length).
        state: The prefill's :class:`DecoderState`.
        decode_kv: The decode steps' selection of cached visual entries
            (:class:`~tokenprune.adapters.vlm.decode_selection.DecodeKV`), or None: they attend to every entry.
    """

    key_valid: list[torch.Tensor | None]
    key_length: list[int]
    compact: list[bool]
    merged: bool
    shift: torch.Tensor
    external_length: int
    state: DecoderState
    decode_kv: Any = None


@dataclass
class ForwardInFlight:
    """The forward in flight (set by the entry hook, read by the layer wrappers)."""

    decode: bool
    active: bool = False  # something is merged or removed (else HF runs untouched and we only log)
    state: DecoderState | None = None
    session: CacheSession | None = None
    external_length: int = 0
    shift: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    mask: Any = None
    mask_version: int = -1
    source: torch.Tensor | None = None  # (B, L) set by merging before the LLM (DecoderState.source)
    inputs: Any = None  # LLMInputs of this prefill, for methods that read them (set at the first layer)
    all_valid: bool = True  # every current token is real (no padding / fill)
    decode_kv: Any = None  # the decode steps' selection the session will hold (decode_selection.DecodeKV), or None

    @property
    def prefill_after_removal(self) -> bool:
        """A prefill whose sequence changed in the LLM: HF's own mask and ``(cos, sin)`` no longer fit it."""
        return not self.decode and self.state is not None and self.state.version > 0


@dataclass
class TowerSequence:
    """Vision-tower signals scattered onto the LLM input sequence (one entry per placeholder, as the features).

    Attributes:
        layer: Tower layer they come from.
        attention: ``(B, L)`` class-token attention (or mean attention received) of each visual token; 0 elsewhere.
        keys: ``(B, L, D)`` head-averaged tower keys of each visual token; 0 elsewhere.
        from_class_token: Which of the two ``attention`` is.
        flops: Per sample, matmul FLOPs of computing these signals (counted with the vision side).
        groups: ``(B, L)`` long, a ViT method merging inside the tower: which merged tower token holds each visual
            token's patch (``TowerSignals.groups``); None otherwise.
    """

    layer: int
    attention: torch.Tensor
    keys: torch.Tensor
    from_class_token: bool
    flops: list[float] = field(default_factory=list)
    groups: torch.Tensor | None = None


@dataclass
class VisualInputs:
    """What a family adapter found in one call's inputs, for the reducer (every tensor ``(B, L)``).

    Attributes:
        visual: Visual placeholders (tokens a method may merge or remove).
        segments: Span id of every visual token (-1: not visual); tokens sharing an id are merged together.
        structural: Image-layout tokens (kept like text, never query rows), or None.
        tower: Computes the :class:`TowerSequence` once the tower has run (None: the family has no tower hook).
    """

    visual: torch.Tensor
    segments: torch.Tensor
    structural: torch.Tensor | None = None
    tower: Callable[[], TowerSequence | None] | None = None

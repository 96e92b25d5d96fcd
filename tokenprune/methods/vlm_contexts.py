"""The typed contexts a vision-language method decides from (see :mod:`tokenprune.methods.vlm` for the contract).

Before the LLM: :class:`PreLLMContext` (with :class:`TowerSignals`) in, :class:`SpanReduction` out. Inside the LLM:
:class:`DecoderLayerContext` (with :class:`LLMInputs`) in, scores and optionally a :class:`Recycling` out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tokenprune.core.sequence import compact, gather_seq


# ----------------------------------------------------------------------------- before the LLM
@dataclass
class TowerSignals:
    """What one vision-tower layer says about the visual tokens of ``S`` spans, one row per LLM token.

    Computed from the layer's own queries and keys (forward hooks), never from ``output_attentions``: the
    tower's attention stays fused. Where one LLM token stands for several patches (a patch merger, pixel
    shuffle), its entries are the mean over those patches.

    Attributes:
        layer: Tower layer index the signals come from.
        attention: ``(S, n)`` the attention the class token pays to each token's patches (towers with a class
            token), or the mean attention each token's patches receive from all patches (towers without one),
            averaged over heads.
        keys: ``(S, n, D)`` the layer's keys, averaged over heads.
        from_class_token: Which of the two ``attention`` is.
        groups: ``(S, n)`` long, when a ViT method merges inside the tower (``tokenprune.apply(vlm, "tome")``):
            which merged tower token holds each token's patch (equal ids: one group); None otherwise.
    """

    layer: int
    attention: torch.Tensor
    keys: torch.Tensor
    from_class_token: bool
    groups: torch.Tensor | None = None


class SpanReduction(NamedTuple):
    """What a pre-LLM method keeps of ``S`` spans: ``K`` tokens each.

    Attributes:
        index: ``(S, K)`` ascending position in the span each kept token is stored at.
        embeds: ``(S, K, C)`` the kept (possibly merged) embeddings.
        size: ``(S, K)`` original tokens each kept token stands for.
        group: ``(S, n)`` for every token of the span, which kept token (``0 .. K-1``) stands for it, -1 for a
            token dropped outright; None (methods that only select): the kept tokens stand for themselves.
    """

    index: torch.Tensor
    embeds: torch.Tensor
    size: torch.Tensor
    group: torch.Tensor | None = None

    def groups(self, n: int) -> torch.Tensor:
        """``(S, n)`` :attr:`group`, or the one a selection implies (kept: its rank, dropped: -1)."""
        if self.group is not None:
            return self.group
        group = torch.full((self.index.shape[0], n), -1, dtype=torch.long, device=self.index.device)
        ranks = torch.arange(self.index.shape[1], device=self.index.device).expand_as(self.index)
        return group.scatter(1, self.index, ranks)


@dataclass
class PreLLMContext:
    """``S`` visual spans of ``n`` tokens each (images, frames or crops of one size) about to enter the LLM.

    Attributes:
        embeds: ``(S, n, C)`` projected visual embeddings (what the LLM would read).
        keep: Tokens every span keeps.
        tower: Signals of the vision-tower layer the method asked for (``tower_layer``); None otherwise.
        text: ``(S, T, C)`` input embeddings of the instruction of each span's prompt (its text tokens after its
            first visual token, image-layout tokens excluded), right-aligned (fill rows first); only for methods
            that set ``reads_text`` (None otherwise).
        text_valid: ``(S, T)`` which rows of ``text`` are real (prompts differ in length).
    """

    embeds: torch.Tensor
    keep: int
    tower: TowerSignals | None = None
    text: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None

    def select(self, scores: torch.Tensor) -> SpanReduction:
        """Keep the ``keep`` highest ``scores`` ``(S, n)`` of every span, in spatial order, unmerged."""
        index = scores.topk(self.keep, dim=1).indices.sort(dim=1).values  # (S, K)
        embeds = self.embeds.gather(1, index[..., None].expand(-1, -1, self.embeds.shape[-1]))
        return SpanReduction(index, embeds, torch.ones_like(index, dtype=self.embeds.dtype))


# ----------------------------------------------------------------------------- inside the LLM
def instruction_mask(valid: torch.Tensor, visual: torch.Tensor, structural: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` real text tokens after a sample's first visual token, image-layout tokens excluded."""
    text = valid & ~visual & (visual.long().cumsum(dim=1) > 0)
    return text if structural is None else text & ~structural


@dataclass
class LLMInputs:
    """What entered the LLM's first layer (after any merging before the LLM), for methods that set
    ``reads_inputs``. ``L`` slots.

    Attributes:
        embeds: ``(B, L, C)`` the first layer's input hidden states (the input embeddings).
        index: ``(B, L)`` input position of each slot (-1: fill).
        valid: ``(B, L)`` real tokens.
        visual: ``(B, L)`` visual tokens.
        structural: ``(B, L)`` image-layout tokens, or None.
    """

    embeds: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    structural: torch.Tensor | None = None


class Recycling(NamedTuple):
    """Pruned tokens a method merges into ``R`` recycled tokens at a removing layer (``B`` samples, ``N`` tokens).

    Each recycled token is stored at the slot of one of its members (it keeps that slot's rotary position) and
    stands for all its members (``size``: the sum of theirs; ``source``: theirs point to it).

    Attributes:
        group: ``(B, N)`` long, which recycled token (``0 .. R-1``) each current token is merged into; -1 for a
            token that is not (kept, text, or dropped outright). Only pruned visual tokens may be members.
        stored: ``(B, R)`` long, the slot each recycled token is stored at (a member of its group); -1 for ids a
            sample does not use (samples make different numbers, as :meth:`VisualPlan.recycled_counts` says).
        hidden: ``(B, R, C)`` the recycled tokens' hidden states (what the next layer reads).
    """

    group: torch.Tensor
    stored: torch.Tensor
    hidden: torch.Tensor


@dataclass
class DecoderLayerContext:
    """One pruning layer's view for a :class:`VisualTokenMethod`. Shapes: ``B`` samples, ``N`` current tokens.

    Attributes:
        layer: Layer index.
        queries: ``(B, H, N, D)`` the layer's queries before the rotary embedding (after q-norm, if it has one).
        keys: ``(B, Hkv, N, D)`` its keys before the rotary embedding (after k-norm, if it has one).
        position_embeddings: The ``(cos, sin)`` the layer used.
        valid: ``(B, N)`` real tokens (False: padding / fill).
        visual: ``(B, N)`` visual tokens.
        rope: The model's ``apply_rotary_pos_emb(q, k, cos, sin)``.
        scale: Softmax scale of the attention.
        structural: ``(B, N)`` image-layout tokens (kept like text, never query rows), or None.
        hidden: ``(B, N, C)`` the layer's output hidden states (what the next layer reads), or None.
        keep: ``(B,)`` visual tokens each sample keeps after this layer (the plan's count; the adapter keeps the
            top ``keep`` scores, less the recycled tokens the plan makes), or None.
        index: ``(B, N)`` input position of each current token (-1: fill), or None.
        inputs: What entered the first layer (:class:`LLMInputs`), for methods that set ``reads_inputs``; None
            otherwise.
        scored_rows: Query rows :meth:`attention_rows` scored (for FLOPs bookkeeping).
    """

    layer: int
    queries: torch.Tensor
    keys: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    valid: torch.Tensor
    visual: torch.Tensor
    rope: Callable
    scale: float
    structural: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    index: torch.Tensor | None = None
    inputs: LLMInputs | None = None
    scored_rows: int = field(default=0)

    @property
    def num_heads(self) -> int:
        return self.queries.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.queries.shape[-1]

    def last_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, row_valid)`` ``(B, 1)``: the last real token of every sample (the one that decodes next)."""
        positions = torch.arange(self.valid.shape[1], device=self.valid.device)
        rows = torch.where(self.valid, positions, -1).amax(dim=1, keepdim=True).clamp(min=0)
        return rows, self.valid.any(dim=1, keepdim=True)

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, row_valid)`` ``(B, T)``: real text tokens after a sample's first visual token."""
        return compact(instruction_mask(self.valid, self.visual, self.structural))

    def rotated_queries(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, D)`` the queries of ``rows`` ``(B, T)`` after the rotary embedding (as attention uses them)."""
        batch, t = rows.shape
        heads, dim = self.num_heads, self.head_dim
        cos, sin = self.position_embeddings
        q = self.queries.gather(2, rows[:, None, :, None].expand(batch, heads, t, dim))  # (B, H, T, D)
        return self.rope(q, q, gather_seq(cos, rows), gather_seq(sin, rows))[0]

    def rotated_keys(self) -> torch.Tensor:
        """``(B, Hkv, N, D)`` every key after the rotary embedding."""
        cos, sin = self.position_embeddings
        return self.rope(self.keys, self.keys, cos, sin)[0]

    def attention_rows(self, rows: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the query ``rows`` ``(B, T)`` over all current tokens, head-averaged.

        The layer's causal, padding-aware softmax, recomputed for these rows only in float32 from its own
        (rotary-embedded) queries and keys. Rows with ``row_valid`` False are zero.

        Returns:
            ``(B, T, N)``.
        """
        batch, n = self.valid.shape
        t, heads, kv_heads, dim = rows.shape[1], self.num_heads, self.num_kv_heads, self.head_dim
        self.scored_rows = max(self.scored_rows, t)
        q = self.rotated_queries(rows).float().view(batch, kv_heads, heads // kv_heads, t, dim)
        k = self.rotated_keys().float().transpose(-1, -2)  # (B, Hkv, D, N)
        positions = torch.arange(n, device=rows.device)
        allowed = self.valid[:, None, :] & (positions[None, None, :] <= rows[:, :, None])  # (B, T, N)
        probs = torch.zeros(batch, t, n, device=rows.device)
        for group in range(kv_heads):  # one key/value head at a time bounds memory to (B, G, T, N)
            logits = (q[:, group] @ k[:, group, None]) * self.scale  # (B, G, T, N)
            probs += logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).sum(dim=1)
        probs /= heads
        return torch.where((row_valid & allowed.any(dim=-1))[..., None], probs, torch.zeros((), device=rows.device))

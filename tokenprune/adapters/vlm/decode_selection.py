"""Decode steps that attend to part of the cached visual entries, reselected as decoding goes (DyCoke stage 2).

A method's :meth:`~tokenprune.methods.vlm.VisualTokenMethod.decode_selection` names a scoring layer ``s``, a
fraction ``keep`` and a ``refresh`` threshold. The prefill marks each sample's *eligible* cached visual entries
(those of spans the method's ``decode_eligible`` accepts; DyCoke: videos) and their count to keep. At every
one-token decode step:

* layers up to ``s`` run as usual, over every cached entry;
* at layer ``s`` the new token's attention over the layer's cache (head-averaged softmax, recomputed for that one
  query from its rotary-embedded query and the cached keys, so the layer itself stays SDPA) scores the eligible
  entries; where the scores' cosine similarity to the previous step's is below ``refresh`` (and at the first
  step), the top ``keep`` of them become the selection; elsewhere the previous selection stays;
* the softmax-attention layers after ``s`` attend to the selected eligible entries and every other cached token
  (text, images, generated tokens): the others are masked for this step only, never removed, so a later step may
  select them again.

The cache keeps every entry (memory is what stage 1 saves); the saving is decode-time attention. Every layer's
cache must hold the same prompt tokens (no removal inside the LLM), which the methods that select so guarantee.
Multi-token calls on the cache (a second turn) and calls inside ``tokenprune.disabled`` attend to everything.
Beam search's cache reordering reorders the selection too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenprune.core.sequence import top_per_row
from tokenprune.methods.vlm import DecodeSelection, count

if TYPE_CHECKING:
    from tokenprune.adapters.vlm.layer import ReducingDecoderLayer
    from tokenprune.adapters.vlm.state import CacheSession


def head_averaged_attention(
    query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """``(B, K)`` one query's softmax attention over ``keys``, averaged over its heads, in float32.

    Args:
        query: ``(B, H, 1, D)`` rotary-embedded.
        keys: ``(B, Hkv, K, D)`` rotary-embedded (grouped-query heads share them).
        allowed: ``(B, K)`` the keys it may attend to.
        scale: The layer's softmax scale.
    """
    q, k = query.float(), keys.float()
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    q = q.view(batch, kv_heads, heads // kv_heads, 1, dim)
    probs = torch.zeros(batch, k.shape[2], device=q.device)
    for group in range(kv_heads):  # one key/value head at a time: (B, G, 1, K)
        logits = (q[:, group] @ k[:, group, None].transpose(-1, -2)) * scale
        probs += logits.masked_fill(~allowed[:, None, None], float("-inf")).softmax(dim=-1).sum(dim=1)[:, 0]
    return probs / heads


@dataclass
class DecodeKV:
    """The decode-step selection of one compact cache (``B`` samples, ``P`` prompt slots per layer).

    Attributes:
        policy: The method's :class:`DecodeSelection`.
        eligible: ``(B, P)`` cached prompt entries the selection ranks.
        counts: ``(B,)`` long, entries selected per sample.
        selected: ``(B, P)`` the current selection (None before the first step).
        scores: ``(B, P)`` the previous step's scores of the eligible entries (0 elsewhere).
        refreshes: ``(B,)`` long, steps that reselected, per sample.
    """

    policy: DecodeSelection
    eligible: torch.Tensor
    counts: torch.Tensor
    selected: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    refreshes: torch.Tensor | None = None


ROWS = ("eligible", "counts", "selected", "scores", "refreshes")  # DecodeKV's per-sample fields


def eligible_tokens(method: Any, spans_per_sample: list, batch: int, length: int, device: Any) -> torch.Tensor | None:
    """``(B, L)`` visual tokens (of the spans ``method.decode_eligible`` accepts) whose cached entries decode steps
    select among; None where the method selects nothing (no policy, ``keep`` 1, no such span)."""
    policy = method.decode_selection()
    if policy is None or policy.keep >= 1.0:
        return None
    eligible = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for b, spans in enumerate(spans_per_sample):
        for _, positions in spans:
            if method.decode_eligible(len(positions)):
                eligible[b, positions] = True
    return eligible if bool(eligible.any()) else None


def open_selection(method: Any, eligible: torch.Tensor, prunes_inside: bool) -> DecodeKV:
    """The selection of a prefill whose entering slots ``eligible`` ``(B, N0)`` are ranked at decode steps.

    Raises:
        NotImplementedError: The plan also removes tokens inside the LLM (layers would cache different tokens).
    """
    if prunes_inside:
        raise NotImplementedError(
            f"tokenprune: method {method.name!r} selects cached visual entries at decode steps; that needs every "
            "layer to cache the same prompt tokens, so it cannot also remove tokens inside the LLM"
        )
    policy = method.decode_selection()
    counts = [count(policy.keep, n) for n in eligible.sum(dim=1).tolist()]
    return DecodeKV(policy, eligible, torch.tensor(counts, device=eligible.device))


def follow_reorder(cache: Any, session: CacheSession) -> None:
    """Make beam search's ``cache.reorder_cache(beam_idx)`` reorder the session's selection rows too."""
    if getattr(cache, "_tokenprune_follows_selection", False):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.LongTensor) -> None:
        original(beam_idx)
        kv = session.decode_kv
        if kv is None:
            return
        for name in ROWS:
            value = getattr(kv, name)
            if value is not None:
                setattr(kv, name, value[beam_idx.to(value.device)])

    cache.reorder_cache = reorder_cache
    cache._tokenprune_follows_selection = True


def valid_keys(session: Any, layer: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, K) bool on ``device``: the keys of ``layer`` a decode step may attend to (all where none are padding)."""
    valid = session.key_valid[layer]
    if valid is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return valid.to(device)


def run_decode_layer(
    wrapper: ReducingDecoderLayer, hidden_states: torch.Tensor, attention_mask: Any, kwargs: dict, session: Any
) -> Any:
    """One decode-step layer under the session's selection (see the module docstring)."""
    kv, reducer, layer = session.decode_kv, wrapper.reducer, wrapper.layer
    scoring = kv.policy.layer
    if hidden_states.shape[1] != 1 or wrapper.capture is None or layer < scoring:
        return wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
    if layer > scoring:
        if kv.selected is None:
            return wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        keys = session.key_length[layer]
        attend = valid_keys(session, layer, hidden_states.shape[0], keys, hidden_states.device).clone()
        skipped = kv.eligible & ~kv.selected  # (B, P)
        attend[:, : skipped.shape[1]] &= ~skipped.to(attend.device)
        mask = reducer.mask(attend, keys, hidden_states)
        return wrapper.base_layer(hidden_states, attention_mask=mask, **kwargs)
    wrapper.capture.active = True
    try:
        out = wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
    finally:
        wrapper.capture.active = False
    queries, _ = wrapper.capture.pop()  # (B, H, 1, D) before the rotary embedding
    cos, sin = kwargs["position_embeddings"]  # the new token's
    query = reducer.rope(queries, queries, cos, sin)[0]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    keys = cache.layers[layer].keys  # (B, Hkv, K, D), the new token's last
    valid = valid_keys(session, layer, keys.shape[0], keys.shape[2], keys.device)
    probs = head_averaged_attention(query, keys, valid, reducer.scale)  # (B, K)
    select(kv, probs[:, : kv.eligible.shape[1]])
    return out


def select(kv: DecodeKV, probs: torch.Tensor) -> None:
    """Update ``kv``'s selection from this step's attention ``probs`` ``(B, P)`` over the prompt entries."""
    eligible = kv.eligible.to(probs.device)
    scores = torch.where(eligible, probs, 0.0)
    fresh = top_per_row(scores, eligible, kv.counts.to(probs.device))
    if kv.selected is None:
        refresh = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        kv.refreshes = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    else:
        similarity = torch.nn.functional.cosine_similarity(scores, kv.scores, dim=1)  # (B,)
        refresh = similarity < kv.policy.refresh
    kv.selected = fresh if kv.selected is None else torch.where(refresh[:, None], fresh, kv.selected)
    kv.refreshes = kv.refreshes + refresh.long()
    kv.scores = scores

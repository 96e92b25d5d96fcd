"""The compact KV cache: which caches can follow removed tokens, and how a decode step is fed onto one.

After a reduced prefill every layer's cache holds only the tokens that entered it. The caller keeps counting
the full sequence (``generate()``'s attention mask and positions), so each decode step is translated: every
layer's key validity grows by the new tokens, and where merging before the LLM renumbered positions
(``merge_positions="compact"``) the caller's positions are shifted back by what was merged away.

Sliding-window layers (only where a family declares their windows and builds their masks: Gemma 3) keep just their
last ``sliding_window - 1`` tokens; their ``key_valid`` / ``key_length`` still count every token that entered the
layer, and the family sizes their decode masks from the cache layer itself.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.adapters.vlm.state import CacheSession


def check_cache(cache: Any, windows: list[int | None] | None = None, recurrent: list[bool] | None = None) -> None:
    """Raise unless ``cache`` is a ``DynamicCache`` whose layers tokenprune's masks follow (or None).

    Args:
        cache: The prefill's cache.
        windows: Per layer, the sliding window of a family whose adapter builds sliding-window masks itself
            (None: a full-attention layer); None (every other family): full-attention layers only. Layer ``l`` must
            be a ``DynamicSlidingWindowLayer`` of window ``windows[l]`` where that is set, a ``DynamicLayer``
            elsewhere.
        recurrent: Per layer, whether it is a linear-attention layer of a family whose adapter masks it itself
            (Qwen3.5): that layer must be a ``LinearAttentionLayer`` (its conv and recurrent states hold no tokens).
    """
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

    layers = getattr(cache, "layers", [])

    def fits(index: int, layer: Any) -> bool:
        if recurrent is not None and index < len(recurrent) and recurrent[index]:
            return type(layer) is LinearAttentionLayer
        window = windows[index] if windows is not None and index < len(windows) else None
        if window is None:
            return type(layer) is DynamicLayer
        return type(layer) is DynamicSlidingWindowLayer and layer.sliding_window == window

    if not isinstance(cache, DynamicCache) or not all(fits(i, layer) for i, layer in enumerate(layers)):
        kinds = sorted({type(layer).__name__ for layer in layers})
        expected = "full-attention layers" if windows is None else "the model's own sliding-window/full layers"
        raise NotImplementedError(
            f"tokenprune removes visual tokens with a DynamicCache of {expected} only, got "
            f"{type(cache).__name__} ({kinds}); use the default cache (cache_implementation='dynamic')"
        )


def decode_step(kwargs: dict, session: CacheSession) -> dict:
    """Advance ``session`` by one decode call's new tokens and rewrite its ``kwargs`` for the compact cache.

    Args:
        kwargs: The text model's keyword inputs (``inputs_embeds`` or ``input_ids``, a 2D ``attention_mask`` over
            the caller's full sequence or None, ``position_ids`` or None).
        session: The cache's bookkeeping (updated in place).

    Returns:
        ``kwargs``, with positions and layer 0's mask translated when merging shortened the cache.
    """
    x = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
    batch, q_len = x.shape[:2]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim != 2:
        raise NotImplementedError("tokenprune: decoding on a compact cache needs a 2D attention_mask (or None)")
    device = session.shift.device
    new_valid = mask[:, -q_len:].bool() if mask is not None else None  # (B, q)
    if new_valid is not None and bool(new_valid.all()):  # one host sync per step, not per layer
        new_valid = None
    for layer, valid in enumerate(session.key_valid):
        if valid is None and new_valid is not None:
            valid = torch.ones(batch, session.key_length[layer], dtype=torch.bool, device=new_valid.device)
        if valid is not None:
            fresh = new_valid if new_valid is not None else torch.ones_like(valid[:, :1]).expand(batch, q_len)
            session.key_valid[layer] = torch.cat([valid, fresh.to(valid.device)], dim=1)  # (B, K_l + q)
        session.key_length[layer] += q_len
    if session.merged:
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = session.external_length + torch.arange(q_len, device=device).expand(batch, q_len)
        kwargs["position_ids"] = positions - session.shift[:, None].to(positions.device)
        first = session.key_valid[0]
        kwargs["attention_mask"] = None if first is None else first.long()
    session.external_length += q_len
    session.state.generated += q_len
    return kwargs

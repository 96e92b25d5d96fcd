"""Attention masks for a shorter (compacted) decoder sequence, built as Hugging Face builds them."""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.adapters.base import check_attn_implementation


def check_decoder_attention(config: Any, owner: str) -> None:
    """Raise unless the language model runs attention as ``sdpa`` or ``eager``."""
    check_attn_implementation(
        config, owner, "inside the language model (it rebuilds their masks for the shorter sequence)"
    )


def refuse_4d_mask() -> None:
    """Raise: a caller-supplied 4D mask cannot follow removed tokens."""
    raise NotImplementedError(
        "tokenprune cannot reduce visual tokens under a caller-supplied 4D attention mask; pass a 2D padding "
        "mask, or run that call inside tokenprune.disabled(model)"
    )


def build_mask(
    key_valid: torch.Tensor | None,
    keys: int,
    q_len: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Causal mask for the last ``q_len`` of ``keys`` keys whose validity is ``key_valid`` ``(B, K)``.

    ``key_valid`` None means every key is valid (no host sync needed to know it). Boolean for SDPA, additive
    float for eager, ``(B or 1, 1, q_len, K)``; None where HF would pass none (every key valid, and a single
    query or a full causal square that SDPA's ``is_causal`` covers).
    """
    if key_valid is None and (q_len == 1 or (implementation == "sdpa" and q_len == keys)):
        return None
    query_pos = keys - q_len + torch.arange(q_len, device=device)
    mask = (torch.arange(keys, device=device)[None, :] <= query_pos[:, None])[None, None]  # (1, 1, Q, K)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]  # (B, 1, Q, K)
    if implementation == "eager":
        mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask

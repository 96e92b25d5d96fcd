"""Recycling inside the LLM (a plan with a ``recycle`` rule, e.g. SparseVLM's).

At a removal the top scores *less the plan's recycled count* stay, and the method's ``recycle`` merges pruned tokens
into recycled tokens (:class:`~tokenprune.methods.vlm.Recycling`), each written at one member's slot (it keeps that
slot's rotary position); ``state.size`` and ``state.source`` follow, so a recycled token counts every input position
it holds.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.adapters.vlm.state import DecoderState
from tokenprune.methods.vlm import DecoderLayerContext


def recycle_pruned(
    method: Any, state: DecoderState, ctx: DecoderLayerContext, scores: torch.Tensor, keep: torch.Tensor, counts: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge pruned tokens into the method's recycled tokens, each stored at one member's slot.

    Updates ``state.size`` (a recycled token holds its members' sizes) and ``state.source`` (its members'
    input positions point to its own); returns the layer output with the recycled hidden states written at
    their slots, and ``keep`` with those slots kept.
    """
    group, stored, merged = method.recycle(ctx, scores, keep, counts)
    r = stored.shape[1]
    real = stored >= 0  # (B, R)
    slot = stored.clamp(min=0)
    member = group >= 0  # (B, N)
    bad = group.shape != keep.shape or merged.shape[:2] != stored.shape or r == 0
    if not bad:
        pruned = state.valid & state.prunable & ~keep
        used = real.gather(1, group.clamp(0, r - 1))  # a member's recycled token is a real one
        at_member = group.gather(1, slot) == torch.arange(r, device=stored.device)
        bad = (
            bool((member & ~pruned).any())
            or bool((group >= r).any())
            or bool((member & ~used).any())
            or bool((real & ~at_member).any())
            or not torch.equal(real.sum(dim=1), counts)
        )
    if bad:
        raise RuntimeError(
            f"tokenprune: method {method.name!r} recycle() must merge only pruned visual tokens, each "
            "recycled token stored at one of its members, as many per sample as the plan's recycled count"
        )
    rows, ranks = real.nonzero(as_tuple=True)
    slots = stored[rows, ranks]
    hidden = ctx.hidden.clone()
    hidden[rows, slots] = merged[rows, ranks].to(hidden.dtype)
    held = torch.zeros(stored.shape, dtype=state.size.dtype, device=stored.device)
    held = held.scatter_add(1, group.clamp(min=0), torch.where(member, state.size, 0))  # (B, R)
    state.size = state.size.clone()
    state.size[rows, slots] = held[rows, ranks]
    # Input positions a member stood for now point to its recycled token's input position.
    standing = state.index.gather(1, slot)  # (B, R)
    length = state.source.shape[1]
    remap = torch.arange(length, device=stored.device).repeat(stored.shape[0], 1)  # (B, L)
    samples, members = member.nonzero(as_tuple=True)
    remap[samples, state.index[samples, members]] = standing[samples, group[samples, members]]
    state.source = torch.where(state.source >= 0, remap.gather(1, state.source.clamp(min=0)), state.source)
    keep = keep.clone()
    keep[rows, slots] = True
    return hidden, keep

"""Early exit for dense prediction (DToP, Tang et al., 2023): pure tensor functions, no module state.

A batch holds a different number of live tokens per image, so sequences are padded: ``valid`` ``(B, L)``
marks real tokens, padded keys are masked out of attention with an additive ``-inf`` bias, and padded
rows are never read back.
"""

from __future__ import annotations

import torch


def select_exits(token_logits: torch.Tensor, valid: torch.Tensor, threshold: float, keep_top_k: int) -> torch.Tensor:
    """Which live tokens exit at a stage boundary.

    A token exits when its top class probability is ``>= threshold``, except the ``keep_top_k`` most
    confident live tokens of each predicted class: they stay in the sequence so later blocks keep context
    of every class (DToP's "keep top-k").

    Args:
        token_logits: ``(B, L, K)`` aux-head logits of the current (padded) patch tokens.
        valid: ``(B, L)`` bool, True for real tokens.
        threshold: Exit when the max class probability is at least this (``> 1``: nobody exits).
        keep_top_k: Per image and class, this many most confident tokens never exit here.

    Returns:
        ``(B, L)`` bool, True for tokens that exit (always a subset of ``valid``).
    """
    probs = token_logits.float().softmax(dim=-1)
    confidence, label = probs.max(dim=-1)  # (B, L) each
    exits = valid & (confidence >= threshold)
    if keep_top_k <= 0 or not bool(exits.any()):
        return exits
    num_classes = token_logits.shape[-1]
    classes = torch.arange(num_classes, device=label.device)
    # (B, L, K): a token's confidence in the column of its predicted class, -inf elsewhere and for pads.
    member = (label.unsqueeze(-1) == classes) & valid.unsqueeze(-1)
    per_class = torch.where(member, confidence.unsqueeze(-1), torch.full_like(confidence, -torch.inf).unsqueeze(-1))
    k = min(keep_top_k, per_class.shape[1])
    top_value, top_index = per_class.topk(k, dim=1)  # (B, k, K)
    # Classes with fewer than k members return -inf slots at arbitrary positions: count only real hits
    # (scatter_add, so such a slot can never clear a real hit of another class).
    hits = torch.zeros(exits.shape, dtype=probs.dtype, device=probs.device)
    hits.scatter_add_(1, top_index.flatten(1), (top_value > -torch.inf).to(probs.dtype).flatten(1))
    return exits & (hits == 0)


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather plan that moves each row's kept tokens to the front, in their current order.

    Args:
        keep: ``(B, L)`` bool.

    Returns:
        ``index`` ``(B, L')`` positions to gather (``L' = max kept per row``; a row's tail past its own
        count points at dropped tokens and must be treated as padding), and ``valid`` ``(B, L')`` bool.
    """
    counts = keep.sum(dim=1)  # (B,)
    new_len = int(counts.max()) if keep.numel() else 0
    # Stable sort on "not kept" keeps kept tokens first, each group in its original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    index = order[:, :new_len]
    valid = torch.arange(new_len, device=keep.device) < counts.unsqueeze(1)
    return index, valid


def key_padding_bias(valid: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias ``(B, 1, 1, P + L)``: 0 for prefix and real tokens, ``-inf`` for padding.

    Returns None when nothing is padded, so an unpadded batch runs exactly the unmasked attention.
    """
    if bool(valid.all()):
        return None
    prefix = torch.ones(valid.shape[0], num_prefix, dtype=torch.bool, device=valid.device)
    keys = torch.cat([prefix, valid], dim=1)  # (B, P + L)
    bias = torch.zeros(keys.shape, dtype=dtype, device=valid.device).masked_fill(~keys, -torch.inf)
    return bias[:, None, None, :]


def scatter_rows(
    target: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, where: torch.Tensor
) -> torch.Tensor:
    """``target[b, positions[b, j]] = rows[b, j]`` for every ``j`` with ``where[b, j]``; others untouched.

    Args:
        target: ``(B, M, D)`` values in original token order.
        positions: ``(B, L)`` original position of each row.
        rows: ``(B, L, D)``.
        where: ``(B, L)`` bool.

    Returns:
        The updated ``target`` (a new tensor).
    """
    batch, num_positions, width = target.shape
    # Rows not written go to a spare column M that is cut off again, so they cannot clobber real ones.
    spare = torch.cat([target, target.new_zeros(batch, 1, width)], dim=1)
    index = torch.where(where, positions, torch.full_like(positions, num_positions))
    spare = spare.scatter(1, index.unsqueeze(-1).expand(-1, -1, width), rows.to(target.dtype))
    return spare[:, :num_positions]

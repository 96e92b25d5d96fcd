"""Bipartite soft matching (ToMe) and the size-weighted, order-preserving merge every method uses.

Positions here are indices into the *current* sequence ``(B, N, C)``. A reduction is described by:

* ``kept``: ``(B, N - removed)`` sorted positions that survive (so spatial order is preserved);
* ``src``/``dst``: ``(B, M)`` positions whose tokens are folded into another token (``dst`` is always kept).

Tokens neither kept nor merged are dropped; their sizes are added to ``state.dropped``.
"""

from __future__ import annotations

import torch

from tokenprune.state import TokenState


def kept_positions(remove_mask: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Sorted positions of the tokens not flagged in ``remove_mask``.

    Args:
        remove_mask: ``(B, N)`` bool with exactly ``n_remove`` True values in every row.
        n_remove: Tokens removed per row (passed in so no device sync is needed).

    Returns:
        ``(B, N - n_remove)`` long positions in ascending order.
    """
    n_keep = remove_mask.shape[1] - n_remove
    # A stable sort puts the kept (0) positions first, still in ascending order; no data-dependent shapes.
    order = remove_mask.to(torch.uint8).argsort(dim=1, stable=True)
    return order[:, :n_keep]


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_protected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching, returning an order-preserving plan.

    Reducible tokens (after the ``num_protected`` prefix) alternate between set A (even offsets) and set B
    (odd offsets). Each A token finds its most similar B token by cosine similarity of ``metric``; the ``r``
    A tokens with the highest similarity are merged into their match.

    Args:
        metric: ``(B, N, D)`` similarity features (ToMe: keys averaged over heads).
        r: Number of tokens to remove, ``0 <= r <= (N - num_protected) // 2``.
        num_protected: Leading tokens that never merge.

    Returns:
        ``(src, dst, kept)``: ``(B, r)``, ``(B, r)`` and ``(B, N - r)`` positions into the sequence.
    """
    n = metric.shape[1]
    max_r = (n - num_protected) // 2
    if not 0 <= r <= max_r:
        raise ValueError(f"r={r} is out of range for {n - num_protected} reducible tokens: 0 <= r <= {max_r}")
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_a = metric[:, num_protected::2]  # (B, Na, D)
    set_b = metric[:, num_protected + 1 :: 2]  # (B, Nb, D)
    scores = set_a @ set_b.transpose(-1, -2)  # (B, Na, Nb)
    best_score, best_b = scores.max(dim=-1)  # (B, Na)
    merged_a = best_score.argsort(dim=-1, descending=True)[:, :r]  # (B, r) local A indices
    src = num_protected + 2 * merged_a
    dst = num_protected + 1 + 2 * best_b.gather(-1, merged_a)
    remove = torch.zeros(metric.shape[:2], dtype=torch.bool, device=metric.device)
    remove.scatter_(1, src, True)
    return src, dst, kept_positions(remove, r)


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """Expand ``(B, M)`` positions to ``(B, M, width)`` for gather/scatter along dim 1."""
    return index.unsqueeze(-1).expand(-1, -1, width)


def reduce_tokens(
    x: torch.Tensor,
    state: TokenState,
    kept: torch.Tensor,
    src: torch.Tensor | None = None,
    dst: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge ``src`` into ``dst`` (weighted average), keep ``kept``, drop the rest; update ``state``.

    Args:
        x: ``(B, N, C)`` tokens.
        state: Updated in place: size, index, source and dropped follow the reduction.
        kept: ``(B, K)`` sorted positions that survive; must contain every ``dst``.
        src: ``(B, M)`` positions folded into ``dst`` (None: pure pruning).
        dst: ``(B, M)`` receiving positions.
        weight: ``(B, N, 1)`` merge weights; defaults to ``state.size`` (ToMe's size-weighted average).

    Returns:
        ``(B, K, C)`` reduced tokens, in the order of ``kept``.
    """
    channels = x.shape[-1]
    size = state.size
    if src is not None and src.shape[1] > 0:
        weight = size if weight is None else weight
        # Sums of weight * x; dividing by the summed weight afterwards gives the weighted average.
        x_weighted = x * weight
        x_weighted = x_weighted.scatter_add(1, _rows(dst, channels), x_weighted.gather(1, _rows(src, channels)))
        weight = weight.scatter_add(1, _rows(dst, 1), weight.gather(1, _rows(src, 1)))
        size = size.scatter_add(1, _rows(dst, 1), size.gather(1, _rows(src, 1)))
        if state.source is not None:
            width = state.source.shape[-1]
            state.source = state.source.scatter_add(1, _rows(dst, width), state.source.gather(1, _rows(src, width)))
        x = x_weighted.gather(1, _rows(kept, channels)) / weight.gather(1, _rows(kept, 1))
    else:
        x = x.gather(1, _rows(kept, channels))
    new_size = size.gather(1, _rows(kept, 1))
    # Whatever size is no longer held by a kept token was dropped (pruning without fusion).
    state.dropped = state.dropped + (state.size.sum(dim=(1, 2)) - new_size.sum(dim=(1, 2)))
    state.size = new_size
    state.index = state.index.gather(1, kept)
    if state.source is not None:
        state.source = state.source.gather(1, _rows(kept, state.source.shape[-1]))
    return x

"""Score-based token selection: top-k keep (pruning) and the EViT-style fuse plan."""

from __future__ import annotations

import torch

from tokenprune.core.merge import kept_positions


def keep_top_k(scores: torch.Tensor, n_keep: int, num_protected: int) -> torch.Tensor:
    """Positions of the protected prefix plus the ``n_keep`` highest-scoring other tokens, sorted.

    Args:
        scores: ``(B, N)`` importance of every token (prefix entries are ignored).
        n_keep: Reducible tokens to keep.
        num_protected: Leading tokens always kept.

    Returns:
        ``(B, num_protected + n_keep)`` ascending positions.
    """
    reducible = scores[:, num_protected:]
    n_reducible = reducible.shape[1]
    if not 0 <= n_keep <= n_reducible:
        raise ValueError(f"n_keep={n_keep} is out of range for {n_reducible} reducible tokens")
    # Removing the lowest scores keeps the output sorted without a second sort of the kept set.
    drop_local = reducible.topk(n_reducible - n_keep, dim=1, largest=False).indices
    remove = torch.zeros_like(scores, dtype=torch.bool)
    remove.scatter_(1, drop_local + num_protected, True)
    return kept_positions(remove, n_reducible - n_keep)


def fuse_plan(scores: torch.Tensor, r: int, num_protected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EViT: drop the ``r + 1`` least important tokens and fuse them into one (net ``r`` fewer tokens).

    The fused token takes the place of the earliest dropped position, so spatial order is preserved.

    Args:
        scores: ``(B, N)`` importance (EViT: class-token attention).
        r: Net tokens removed, ``1 <= r <= N - num_protected - 1``.
        num_protected: Leading tokens never fused.

    Returns:
        ``(src, dst, kept)`` positions for :func:`tokenprune.core.merge.reduce_tokens`.
    """
    reducible = scores[:, num_protected:]
    n_reducible = reducible.shape[1]
    if not 1 <= r <= n_reducible - 1:
        raise ValueError(f"r={r} is out of range for {n_reducible} reducible tokens: 1 <= r <= {n_reducible - 1}")
    fused = reducible.topk(r + 1, dim=1, largest=False).indices.sort(dim=1).values + num_protected
    dst = fused[:, :1].expand(-1, r)  # (B, r): all fold into the earliest fused position
    src = fused[:, 1:]
    remove = torch.zeros_like(scores, dtype=torch.bool)
    remove.scatter_(1, src, True)
    return src, dst, kept_positions(remove, r)

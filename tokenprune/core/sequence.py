"""Sequence operations on ``(B, N)`` token layouts: compaction, gathers, per-row top-k, spans. Pure functions."""

from __future__ import annotations

import torch


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned gather plan for the ``True`` entries of ``keep`` ``(B, N)``, order preserved.

    Returns:
        ``(gather, slot_valid)``, both ``(B, N')`` with ``N' = max(keep.sum(1))``: positions to gather and
        whether a slot holds a kept token (left fill slots point at some kept token and are False).
    """
    counts = keep.sum(dim=1)  # (B,)
    n_new = int(counts.max()) if keep.numel() else 0
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)  # kept positions first, ascending
    source = torch.arange(n_new, device=keep.device)[None, :] - (n_new - counts)[:, None]  # (B, N')
    slot_valid = source >= 0
    gather = order.gather(1, source.clamp(min=0))
    return gather, slot_valid


def gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence dim of ``t`` ``(..., B or 1, N, D)`` with ``index`` ``(B, T)``: ``(..., B, T, D)``."""
    batch, length = index.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, batch, t.shape[-2], t.shape[-1])
    return t.gather(-2, index[..., None].expand(*lead, batch, length, t.shape[-1]))


def gather_positions(p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``(..., B or 1, N)`` with ``index`` ``(B, T)``: ``(..., B, T)``."""
    lead = p.shape[:-2]
    p = p.expand(*lead, index.shape[0], p.shape[-1])
    return p.gather(-1, index.expand(*lead, *index.shape))


def top_per_row(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` the ``counts[b]`` highest-scoring ``candidates`` of every row (ties: earlier first)."""
    masked = torch.where(candidates, scores, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return candidates & (ranks < counts[:, None])


def split_runs(mask: torch.Tensor, length: int | None) -> torch.Tensor:
    """``(B, L)`` id of every ``True`` entry of ``mask`` (unique in the batch), -1 elsewhere.

    A run of consecutive ``True`` entries is split into pieces of ``length`` (the last piece may be shorter if
    the run is not a multiple); None keeps each run whole.
    """
    batch, size = mask.shape
    positions = torch.arange(size, device=mask.device).expand(batch, size)
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    run_start = torch.where(starts, positions, -1).cummax(dim=1).values
    run_id = starts.long().cumsum(dim=1)
    piece = (positions - run_start) // length if length else torch.zeros_like(positions)
    ids = (run_id * (size + 1) + piece) + torch.arange(batch, device=mask.device)[:, None] * (size + 1) ** 2
    return torch.where(mask, ids, -1)


def segment_positions(segments: torch.Tensor) -> list[list[tuple[int, list[int]]]]:
    """Per row, ``(segment, positions)`` of each segment of ``segments`` ``(B, L)`` (id -1: none), in order.

    A segment is a maximal run of one id among a row's non-negative entries: it may straddle other tokens (e.g. a
    high-resolution grid whose rows end in structural newline tokens). ``positions`` ascend.
    """
    out: list[list[tuple[int, list[int]]]] = [[] for _ in range(segments.shape[0])]
    cpu = segments.cpu()
    if not bool((cpu >= 0).any()):
        return out
    for b, row in enumerate(cpu):
        positions = (row >= 0).nonzero().squeeze(1)
        ids, counts = torch.unique_consecutive(row[positions], return_counts=True)
        for segment, span in zip(ids.tolist(), positions.split(counts.tolist()), strict=True):
            out[b].append((segment, span.tolist()))
    return out

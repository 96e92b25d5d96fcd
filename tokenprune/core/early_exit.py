"""Early exit for dense prediction (DToP, Tang et al., 2023): pure tensor functions, no module state.

A batch holds a different number of live tokens per image, so sequences are padded: ``valid`` ``(B, L)``
marks real tokens, padded keys are masked out of attention with an additive ``-inf`` bias, and padded
rows are never read back.

A FLOPs budget (``dtop``'s ``quota`` / ``flops``) fixes how many tokens exit at each boundary instead of a
confidence threshold: :func:`select_quota_exits` picks exactly that many per image, :func:`quota_counts`
turns per-stage fractions into exact counts, and :func:`solve_exit_counts` / :func:`shaped_exit_counts` find
counts whose cost is nearest a budget, given the cost of any (fractional) counts as a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    confidence, label = token_logits.float().softmax(dim=-1).max(dim=-1)  # (B, L) each
    exits = valid & (confidence >= threshold)
    if keep_top_k <= 0 or not bool(exits.any()):
        return exits
    return exits & ~protected_top_k(confidence, label, valid, keep_top_k, token_logits.shape[-1])


def protected_top_k(
    confidence: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, keep_top_k: int, num_classes: int
) -> torch.Tensor:
    """``(B, L)`` bool: per image and predicted class, the ``keep_top_k`` most confident live tokens.

    Args:
        confidence: ``(B, L)`` top class probability.
        label: ``(B, L)`` predicted class.
        valid: ``(B, L)`` bool, True for real tokens (pads are never protected).
        keep_top_k: Tokens kept per class (``<= 0``: none).
        num_classes: ``K``.
    """
    if keep_top_k <= 0:
        return torch.zeros_like(valid)
    classes = torch.arange(num_classes, device=label.device)
    # (B, L, K): a token's confidence in the column of its predicted class, -inf elsewhere and for pads.
    member = (label.unsqueeze(-1) == classes) & valid.unsqueeze(-1)
    per_class = torch.where(member, confidence.unsqueeze(-1), torch.full_like(confidence, -torch.inf).unsqueeze(-1))
    k = min(keep_top_k, per_class.shape[1])
    top_value, top_index = per_class.topk(k, dim=1)  # (B, k, K)
    # Classes with fewer than k members return -inf slots at arbitrary positions: count only real hits
    # (scatter_add, so such a slot can never clear a real hit of another class).
    hits = torch.zeros(valid.shape, dtype=confidence.dtype, device=confidence.device)
    hits.scatter_add_(1, top_index.flatten(1), (top_value > -torch.inf).to(confidence.dtype).flatten(1))
    return hits > 0


def select_quota_exits(
    token_logits: torch.Tensor, valid: torch.Tensor, count: int | torch.Tensor, keep_top_k: int
) -> torch.Tensor:
    """Exactly ``count`` live tokens exit per image: the most confident ones (a FLOPs budget, not a threshold).

    Tokens are ranked by top class probability; the ``keep_top_k`` most confident of each predicted class
    (as in :func:`select_exits`) rank after every other live token, so they exit only when the quota cannot
    be met without them. Ties go to the lower position (a stable sort), so a batch decides as one by one.

    Args:
        token_logits: ``(B, L, K)`` aux-head logits of the current (padded) patch tokens.
        valid: ``(B, L)`` bool, True for real tokens.
        count: Tokens that exit, one int for every image or ``(B,)``; capped at each image's live tokens.
        keep_top_k: Per image and class, this many most confident tokens are the last to exit.

    Returns:
        ``(B, L)`` bool, True for tokens that exit: ``min(count, live)`` per image, a subset of ``valid``.
    """
    confidence, label = token_logits.float().softmax(dim=-1).max(dim=-1)  # (B, L) each
    protected = protected_top_k(confidence, label, valid, keep_top_k, token_logits.shape[-1])
    # Confidence is in [0, 1]: protected tokens move to [-2, -1], below every unprotected one; pads to -inf.
    key = torch.where(valid, confidence - 2.0 * protected.to(confidence.dtype), -torch.inf)
    order = torch.argsort(key, dim=1, descending=True, stable=True)  # (B, L)
    places = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, places)  # (B, L): each token's place in the ranking
    count = torch.as_tensor(count, device=valid.device).reshape(-1, 1)  # (B or 1, 1)
    return valid & (rank < count)


def quota_counts(quota: Sequence[float], num_patches: int) -> list[int]:
    """Exact tokens exiting at each stage for per-stage fractions of the ``num_patches`` original tokens.

    Cumulative rounding (``round(M * sum(quota[:s + 1]))`` have exited after stage ``s``), so the counts never
    sum past ``round(M * sum(quota))`` and a count ``c`` given as ``c / M`` comes back as ``c``.
    """
    counts, before, total = [], 0, 0.0
    for fraction in quota:
        total += fraction
        after = min(num_patches, round(num_patches * total))
        counts.append(max(0, after - before))
        before += counts[-1]
    return counts


def _nearest_last(
    counts: Sequence[float], stage: int, num_patches: int, cost: Callable[[Sequence[float]], float], target: float
) -> list[int]:
    """Round ``counts``, then set ``counts[stage]`` to the integer whose cost is nearest ``target``."""
    rounded = quota_counts([c / num_patches for c in counts], num_patches)
    room = num_patches - (sum(rounded) - rounded[stage])
    # Cost falls as more tokens exit: bisection for the first count at or below the target, then the nearer
    # of it and the one before.
    low, high = 0, room
    while low < high:
        mid = (low + high) // 2
        if cost([*rounded[:stage], mid, *rounded[stage + 1 :]]) <= target:
            high = mid
        else:
            low = mid + 1
    options = [c for c in (low - 1, low) if 0 <= c <= room]
    best = min(options, key=lambda c: abs(cost([*rounded[:stage], c, *rounded[stage + 1 :]]) - target))
    return [*rounded[:stage], best, *rounded[stage + 1 :]]


def _bisect(fraction_of: Callable[[float], float], target: float) -> float:
    """The ``t`` in [0, 1] with ``fraction_of(t)`` nearest ``target`` (``fraction_of`` non-increasing)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if fraction_of(mid) > target:
            low = mid
        else:
            high = mid
    return high


def min_exit_fraction(num_patches: int, num_stages: int, cost: Callable[[Sequence[float]], float]) -> float:
    """The least cost early exit reaches: every token exits at the first boundary."""
    return cost([float(num_patches)] + [0.0] * (num_stages - 1))


def solve_exit_counts(
    fraction: float, num_patches: int, num_stages: int, cost: Callable[[Sequence[float]], float]
) -> list[int]:
    """Exit counts per stage at a budget: the same share ``rho`` of the live tokens exits at every boundary.

    Args:
        fraction: Budget, relative cost in (0, 1].
        num_patches: ``M`` original patch tokens.
        num_stages: ``S`` boundaries.
        cost: Relative cost of (fractional) exit counts per stage, non-increasing in each count.

    Returns:
        ``S`` ints summing to at most ``M``; the last stage's count is tuned to the integer nearest the budget.

    Raises:
        ValueError: ``fraction`` below what exiting every token at the first boundary costs.
    """
    _check_reachable(fraction, num_patches, num_stages, cost)

    def counts(rho: float) -> list[float]:
        out, live = [], float(num_patches)
        for _ in range(num_stages):
            out.append(rho * live)
            live -= out[-1]
        return out

    rho = _bisect(lambda r: cost(counts(r)), fraction)
    if rho >= 1.0:  # the budget needs every token out at the first boundary
        return [num_patches] + [0] * (num_stages - 1)
    return _nearest_last(counts(rho), num_stages - 1, num_patches, cost, fraction)


def shaped_exit_counts(
    fraction: float, shares: Sequence[float], num_patches: int, cost: Callable[[Sequence[float]], float]
) -> list[int] | None:
    """Exit counts ``lam * shares * M`` per stage, ``lam`` solved to the budget (the calibration candidates).

    Args:
        fraction: Budget, relative cost in (0, 1].
        shares: Non-negative share of the exiting tokens per stage, summing to 1.
        num_patches: ``M``.
        cost: As in :func:`solve_exit_counts`.

    Returns:
        The counts (the last stage with a share tuned to the nearest integer), or None when this shape cannot
        reach the budget even with every token exiting.
    """

    def counts(lam: float) -> list[float]:
        return [lam * share * num_patches for share in shares]

    if cost(counts(1.0)) > fraction:
        return None
    lam = _bisect(lambda t: cost(counts(t)), fraction)
    last = max(s for s, share in enumerate(shares) if share > 0)
    return _nearest_last(counts(lam), last, num_patches, cost, fraction)


def _check_reachable(
    fraction: float, num_patches: int, num_stages: int, cost: Callable[[Sequence[float]], float]
) -> None:
    least = min_exit_fraction(num_patches, num_stages, cost)
    if not least <= fraction <= 1.0:
        raise ValueError(
            f"flops budget {fraction} is outside what early exit reaches on this segmenter: [{least:.4f}, 1] "
            f"(the low end: every token exits at the first boundary)"
        )


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

"""Per-layer reduction schedules: validate a user's ``r`` and solve one for a FLOPs budget.

A schedule is a list with one entry per layer: how many tokens that layer removes. Which tokens a layer
can remove depends on the tokens still there, so every function walks the layers counting them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MaxRemovable = Callable[[int], int]  # reducible tokens -> most tokens one layer may remove


def resolve_schedule(
    r: int | Sequence[int], depth: int, num_tokens: int, num_protected: int, max_removable: MaxRemovable
) -> list[int]:
    """Turn ``r`` into a validated per-layer schedule.

    An ``int`` means "remove ``r`` per layer" and, as in ToMe, is capped at what each layer can remove once
    few tokens remain; it must be possible at the first layer. A list gives one exact count per layer and
    every entry must be possible.

    Args:
        r: Tokens per layer, or a list with one count per layer.
        depth: Number of layers.
        num_tokens: Tokens entering the first layer, prefix included.
        num_protected: Prefix tokens that are never removed.
        max_removable: The method's limit for one layer, given the reducible token count.

    Returns:
        One non-negative count per layer.

    Raises:
        ValueError: Negative counts, a list of the wrong length, or more tokens than a layer allows.
    """
    reducible = num_tokens - num_protected
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if r > max_removable(reducible):
            raise ValueError(
                f"r={r} removes more tokens than the first layer allows: {reducible} reducible tokens, "
                f"at most {max_removable(reducible)} per layer for this method"
            )
        schedule = []
        for _ in range(depth):
            step = min(r, max_removable(reducible))
            schedule.append(step)
            reducible -= step
        return schedule
    schedule = [int(step) for step in r]
    if len(schedule) != depth:
        raise ValueError(f"a list schedule needs one entry per layer: got {len(schedule)}, model has {depth}")
    for layer, step in enumerate(schedule):
        limit = max_removable(reducible)
        if not 0 <= step <= limit:
            raise ValueError(
                f"schedule entry {step} at layer {layer} is out of range: {reducible} reducible tokens "
                f"remain there, valid counts are 0..{limit}"
            )
        reducible -= step
    return schedule


def _schedule_at_rate(rate: float, depth: int, reducible: int, max_removable: MaxRemovable) -> list[int]:
    """Remove ``rate`` tokens per layer on average (cumulative rounding), capped per layer."""
    schedule = []
    removed = 0
    for layer in range(depth):
        step = max(0, min(round(rate * (layer + 1)) - removed, max_removable(reducible)))
        schedule.append(step)
        removed += step
        reducible -= step
    return schedule


def solve_flops_schedule(
    fraction: float,
    depth: int,
    num_tokens: int,
    num_protected: int,
    max_removable: MaxRemovable,
    cost: Callable[[list[int]], float],
) -> list[int]:
    """Find a near-uniform schedule whose cost is closest to ``fraction`` of the unreduced cost.

    The average removal rate is bisected over real numbers and rounded cumulatively, which gives a
    finer FLOPs granularity than integer ``r`` alone; the best of the final candidates is returned.

    Args:
        fraction: Target cost relative to the unreduced model, in (0, 1].
        depth: Number of layers.
        num_tokens: Tokens entering the first layer, prefix included.
        num_protected: Prefix tokens never removed.
        max_removable: The method's per-layer limit.
        cost: Analytic cost of a schedule (same units for every call).

    Returns:
        The per-layer schedule.

    Raises:
        ValueError: ``fraction`` outside (0, 1] or below what the method can reach.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"flops budget must be in (0, 1], got {fraction}")
    reducible = num_tokens - num_protected
    full = cost([0] * depth)
    if fraction == 1.0:
        return [0] * depth
    low, high = 0.0, float(reducible)
    deepest = _schedule_at_rate(high, depth, reducible, max_removable)
    floor = cost(deepest) / full
    if floor > fraction:
        raise ValueError(
            f"flops budget {fraction} is below what this method can reach on {num_tokens} tokens "
            f"(lowest: {floor:.3f}); valid budgets are in [{floor:.3f}, 1]"
        )
    candidates = {}
    for _ in range(60):
        mid = (low + high) / 2
        schedule = _schedule_at_rate(mid, depth, reducible, max_removable)
        relative = cost(schedule) / full
        candidates[tuple(schedule)] = relative
        if relative > fraction:
            low = mid
        else:
            high = mid
    best = min(candidates, key=lambda s: abs(candidates[s] - fraction))
    return list(best)

"""Search a per-layer schedule at a fixed FLOPs budget that minimises a user-supplied objective.

Pure bookkeeping over schedules (one count of removed tokens per layer, as in :mod:`tokenprune.core.schedule`):
the objective (e.g. the KL divergence between a reduced and the unreduced model on calibration images) is a
callable, so nothing here runs a model. The search is

1. **shapes**: cumulative removal after layer ``l`` proportional to ``((l + 1) / depth) ** gamma`` for a few
   ``gamma`` (``gamma = 1`` is the constant rate of :func:`~tokenprune.core.schedule.solve_flops_schedule`,
   ``gamma < 1`` removes earlier, ``gamma > 1`` later), each solved to the budget by bisection;
2. **greedy per-layer moves** from the best shape: one layer removes ``delta`` fewer tokens and another removes
   the count that brings the cost back nearest the budget; a move is kept when it lowers the objective.

Every candidate is checked against the method's per-layer limit and the budget tolerance before it is scored,
and the moves are drawn from a seeded generator, so a search is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenprune.core.schedule import MaxRemovable, resolve_schedule, solve_flops_schedule

#: Shapes tried before the per-layer moves (1.0, the constant rate, is the start).
DEFAULT_GAMMAS = (0.5, 0.7, 0.85, 1.2, 1.5, 2.0)


@dataclass
class ScheduleSpace:
    """The schedules one model and method allow, and what each costs.

    Attributes:
        depth: Number of layers.
        num_tokens: Tokens entering the first layer, prefix included.
        num_protected: Prefix tokens never removed.
        max_removable: The method's per-layer limit given the reducible tokens left.
        cost: Analytic cost of a schedule (e.g. FLOPs per image).
    """

    depth: int
    num_tokens: int
    num_protected: int
    max_removable: MaxRemovable
    cost: Callable[[list[int]], float]

    def __post_init__(self) -> None:
        self.full = self.cost([0] * self.depth)

    @property
    def reducible(self) -> int:
        return self.num_tokens - self.num_protected

    def ratio(self, schedule: Sequence[int]) -> float:
        """Cost of ``schedule`` relative to the unreduced model."""
        return self.cost(list(schedule)) / self.full

    def is_valid(self, schedule: Sequence[int]) -> bool:
        """True when every entry is within the method's limit at that layer."""
        try:
            resolve_schedule(list(schedule), self.depth, self.num_tokens, self.num_protected, self.max_removable)
        except ValueError:
            return False
        return True

    def constant(self, fraction: float) -> list[int]:
        """The constant-rate schedule the library solves for ``fraction`` (``flops=`` without calibration)."""
        return solve_flops_schedule(
            fraction, self.depth, self.num_tokens, self.num_protected, self.max_removable, self.cost
        )

    def shaped(self, total: float, gamma: float) -> list[int]:
        """Cumulative removal ``total * ((l + 1) / depth) ** gamma`` after layer ``l``, rounded and capped."""
        schedule, removed, reducible = [], 0, self.reducible
        for layer in range(self.depth):
            target = round(total * ((layer + 1) / self.depth) ** gamma)
            step = max(0, min(target - removed, self.max_removable(reducible)))
            schedule.append(step)
            removed += step
            reducible -= step
        return schedule

    def solve_shaped(self, fraction: float, gamma: float) -> list[int]:
        """The ``gamma``-shaped schedule whose cost is nearest ``fraction`` (bisection on the total removed)."""
        low, high = 0.0, float(self.reducible)
        candidates: dict[tuple[int, ...], float] = {}
        for _ in range(50):
            mid = (low + high) / 2
            schedule = self.shaped(mid, gamma)
            relative = self.ratio(schedule)
            candidates[tuple(schedule)] = relative
            if relative > fraction:
                low = mid
            else:
                high = mid
        return list(min(candidates, key=lambda s: abs(candidates[s] - fraction)))

    def transfer(self, schedule: Sequence[int], give: int, take: int, delta: int, fraction: float) -> list[int] | None:
        """Layer ``give`` removes ``delta`` fewer tokens, layer ``take`` what brings the cost nearest ``fraction``.

        Returns:
            The new schedule, or None when ``give`` removes fewer than ``delta`` or no valid count exists.
        """
        if give == take or schedule[give] < delta:
            return None
        moved = list(schedule)
        moved[give] -= delta
        reducible = self.reducible - sum(moved[:take])
        best, best_gap = None, float("inf")
        for extra in range(0, self.max_removable(reducible) - moved[take] + 1):
            candidate = list(moved)
            candidate[take] += extra
            gap = abs(self.ratio(candidate) - fraction)
            if gap < best_gap:
                best, best_gap = candidate, gap
            elif self.ratio(candidate) < fraction:
                break  # cost falls with every extra token: past the budget, the gap only grows
        if best is None or not self.is_valid(best) or list(best) == list(schedule):
            return None
        return best


@dataclass
class SearchResult:
    """Outcome of :func:`search_schedule`.

    Attributes:
        schedule: The best schedule found.
        value: Its objective.
        start: The constant-rate schedule the search started from.
        start_value: Its objective.
        evaluations: Objective evaluations spent.
        history: ``(evaluation, best value)`` each time the best improved.
    """

    schedule: list[int]
    value: float
    start: list[int]
    start_value: float
    evaluations: int
    history: list[tuple[int, float]] = field(default_factory=list)


def search_schedule(
    space: ScheduleSpace,
    fraction: float,
    objective: Callable[[list[int]], float],
    max_evals: int = 48,
    tolerance: float = 0.005,
    seed: int = 0,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    on_eval: Callable[[float], None] | None = None,
) -> SearchResult:
    """Minimise ``objective`` over schedules whose cost stays within the budget.

    A candidate is admissible when its relative cost is within ``tolerance * fraction`` of ``fraction`` (or as
    close as the constant-rate start, if that is farther: tiny models cannot hit every budget exactly).

    Args:
        space: The schedules the model and method allow.
        fraction: FLOPs budget relative to the unreduced model, in (0, 1].
        objective: Lower is better; called once per distinct admissible schedule.
        max_evals: Objective evaluations at most (the start counts as one); >= 1.
        tolerance: Relative budget tolerance.
        seed: Seed of the move generator.
        gammas: Shapes tried first.
        on_eval: Called with the best value after every evaluation (progress bars).

    Returns:
        The :class:`SearchResult`.

    Raises:
        ValueError: ``fraction`` out of range or below what the method reaches (from the constant solver),
            ``max_evals < 1`` or a negative ``tolerance``.
    """
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    start = space.constant(fraction)
    slack = max(tolerance * fraction, abs(space.ratio(start) - fraction)) + 1e-12
    seen: dict[tuple[int, ...], float] = {}

    def admissible(schedule: Sequence[int]) -> bool:
        return abs(space.ratio(schedule) - fraction) <= slack and space.is_valid(schedule)

    def score(schedule: list[int]) -> float:
        seen[tuple(schedule)] = value = float(objective(schedule))
        if on_eval is not None:
            on_eval(min(seen.values()))
        return value

    best, best_value = start, score(start)
    result = SearchResult(list(start), best_value, list(start), best_value, 0, [(1, best_value)])
    if fraction == 1.0 or sum(start) == 0:
        result.evaluations = len(seen)
        return result
    for gamma in gammas:
        if len(seen) >= max_evals:
            break
        candidate = space.solve_shaped(fraction, gamma)
        if tuple(candidate) in seen or not admissible(candidate):
            continue
        value = score(candidate)
        if value < best_value:
            best, best_value = candidate, value
            result.history.append((len(seen), value))
    rng = random.Random(seed)
    mean = max(1, round(sum(start) / space.depth))
    steps = sorted({1, max(1, mean // 4), max(1, mean // 2), mean})
    attempts = 0
    while len(seen) < max_evals and attempts < 50 * max_evals:
        attempts += 1
        give, take = rng.sample(range(space.depth), 2)
        candidate = space.transfer(best, give, take, rng.choice(steps), fraction)
        if candidate is None or tuple(candidate) in seen or not admissible(candidate):
            continue
        value = score(candidate)
        if value < best_value:
            best, best_value = candidate, value
            result.history.append((len(seen), value))
    result.schedule, result.value, result.evaluations = list(best), best_value, len(seen)
    return result

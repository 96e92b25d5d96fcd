"""Named settings of registered methods for sweeps and ``tokenprune eval``: a name -> (method, fixed options).

The eval harness accepts, for a model kind, every method registered for that kind plus the variants here whose
method is; nothing outside ``methods/`` names a method. ``random`` on a vision-language model is
``random_visual`` (the registered ``random`` drops ViT tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenprune import registry


def _late_prune_schedules(depth: int) -> Iterator[dict[str, float]]:
    """AIM's pruning window in multiples of 1/depth, later and milder first (layer 0 always sees every token:
    its attention scores the first cut)."""
    for start in range(depth, 0, -1):
        for end in range(depth, start - 1, -1):
            yield {"prune_start": start / depth, "prune_end": end / depth}


@dataclass(frozen=True)
class Variant:
    """A named setting of a registered method.

    Attributes:
        method: The registered method it runs.
        options: Options it fixes (``--set`` options are added on top).
        note: What it isolates, for messages.
        search: ``depth -> candidate options``: the budget is met by the candidate whose measured FLOPs come
            closest (the first of equals), instead of by the method's own solver; None: the method solves it.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    search: Callable[[int], Iterator[dict[str, Any]]] | None = None


VARIANTS: dict[str, Variant] = {
    "aim_merge": Variant("aim", {"prune_start": 1.0, "prune_end": 1.0}, "merging before the LLM only"),
    "aim_prune": Variant("aim", {"merge_keep": 1.0}, "pruning only, layer 0 sees every visual token",
                         _late_prune_schedules),
    # AIM with its pruning moved to the last quarter of the layers (8 layers: half the visual tokens leave
    # before layer 7), the FLOPs budget met by merging: for shallow LLMs whose late layers still read the image.
    "aim_late": Variant("aim", {"prune_start": 0.75, "prune_end": 1.0}, "pruning in the last quarter"),
    "fastv_k1": Variant("fastv", {"k": 1}, "prunes after layer 0: reaches lower budgets than K = 2"),
    "random": Variant("random_visual", {}, "FastV's schedule (K = 2), random visual tokens"),
    "random_k1": Variant("random_visual", {"k": 1}, "random visual tokens after layer 0"),
}  # fmt: skip


def names(kind: str) -> list[str]:
    """Every name the harness accepts for ``kind``: registered methods, then variants, each sorted."""
    own = registry.methods(kind)
    extra = sorted(n for n, v in VARIANTS.items() if n not in own and kind in registry.get_method(v.method).kinds)
    return [*own, *extra]


def resolve(name: str, kind: str) -> tuple[str, Variant]:
    """``(registered method, variant)`` of a name for ``kind`` (a registered method is its own plain variant).

    Raises:
        ValueError: The name is neither, with the valid ones listed.
    """
    if name in registry.methods(kind):
        return name, Variant(name)
    variant = VARIANTS.get(name)
    if variant is None or kind not in registry.get_method(variant.method).kinds:
        raise ValueError(f"unknown method {name!r} for a {kind} model; valid: {names(kind)}")
    return variant.method, variant


def is_control(name: str) -> bool:
    """True for the control (``none``): a registered method that declares ``control``.

    Variants and unknown names are not (a variant fixes options of a reducing method).
    """
    return name in registry.methods() and registry.get_method(name).method_cls.control

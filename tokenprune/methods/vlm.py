"""The vision-language method contract: what a VLM method decides (its typed contexts: :mod:`.vlm_contexts`).

A ViT method reduces a token sequence layer by layer (``Method.reduce``). A language model is different: visual
tokens are per-sample spans inside text that is never touched, their number is only known per prompt, and the
adapter (not the method) must follow masks, rotary positions and the KV cache. A :class:`VisualTokenMethod`
therefore only *decides*, at two points:

* **before the LLM**, once per image span: :meth:`VisualTokenMethod.merge` receives a :class:`PreLLMContext`
  (the projected visual embeddings of same-size spans and, if the method sets ``tower_layer``, the
  :class:`TowerSignals` of that vision-tower layer) and returns which tokens stay, merged or selected;
* **inside the LLM**, at each layer after which the plan has fewer visual tokens:
  :meth:`VisualTokenMethod.importance` receives a :class:`DecoderLayerContext` (the layer's queries and keys,
  rotary-embedded on request, its valid/visual/text rows) and scores every token. A method whose plan recycles
  (:attr:`VisualPlan.recycle`) also merges some pruned tokens into recycled ones there
  (:meth:`VisualTokenMethod.recycle` returns a :class:`Recycling`).

:meth:`VisualTokenMethod.plan_for` says how many visual tokens survive each of the two (a :class:`VisualPlan`);
the adapter (``tokenprune.adapters.vlm``) does everything else: spans, per-sample top-k, real removal,
positions, masks, cache bookkeeping, FLOPs budgets and ``generate()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokenprune.config import ConfigOptions
from tokenprune.methods.base import Method
from tokenprune.methods.vlm_contexts import (  # noqa: F401  (the contexts, importable from here as before)
    DecoderLayerContext,
    LLMInputs,
    PreLLMContext,
    Recycling,
    SpanReduction,
    TowerSignals,
    instruction_mask,
)


def count(fraction: float, total: int) -> int:
    """``fraction`` of ``total`` tokens, rounded half up, clamped to ``[0, total]``."""
    return min(total, max(0, math.floor(fraction * total + 0.5 + 1e-9)))


def check_fraction(name: str, value: Any, low_open: bool) -> float:
    """``value`` as a float in ``(0, 1]`` (``low_open``) or ``[0, 1]``; raises naming the valid interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not ((0.0 < value) if low_open else (0.0 <= value)) or value > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


@dataclass
class VLMReductionConfig(ConfigOptions):
    """Options shared by the vision-language methods.

    There is no ``r``/``input_size``/``trace_source``: visual token counts are read from each prompt.

    Attributes:
        flops: Instead of the method's own ratio: target LLM *prefill* FLOPs as a fraction of the unreduced
            prefill (vision tower, projector and LM head excluded), in (0, 1]. Solved per prompt (its text and
            visual token counts), so every sample of a batch gets the budget.
    """

    flops: float | None = None

    def __post_init__(self) -> None:
        if self.flops is not None:
            self.flops = check_fraction("flops (fraction of the unreduced LLM prefill FLOPs)", self.flops, True)

    def ratio_or_flops(self, name: str, default: float, low_open: bool = False) -> None:
        """Validate the method's own ratio option ``name`` against ``flops``: one of the two, or ``default``."""
        value = getattr(self, name)
        if value is not None:
            if self.flops is not None:
                raise ValueError(f"give either {name} or flops, not both")
            setattr(self, name, check_fraction(name, value, low_open))
        elif self.flops is None:
            setattr(self, name, default)


@dataclass(frozen=True)
class VisualPlan:
    """What a method does to one prompt's visual tokens.

    Attributes:
        merge_keep: Fraction of each image's tokens left before the LLM, merged or selected (1.0: untouched).
        fractions: One entry per LLM layer: fraction of the (pre-LLM reduced) visual tokens entering that layer.
            ``fractions[0]`` is 1.0 (the first layer's attention is what the first pruning scores with) and
            the entries never increase. With ``recycle``: the fraction *selected by score*.
        recycle: None (pruned tokens are dropped), or the number of recycled tokens a removal of ``pruned``
            tokens makes (at most ``pruned``): then the visual tokens entering a layer are the selected ones plus
            the recycled ones (:meth:`visual_counts`), and the method's ``recycle`` makes them.
    """

    merge_keep: float
    fractions: tuple[float, ...]
    recycle: Callable[[int], int] | None = field(default=None, compare=False)

    @classmethod
    def identity(cls, depth: int) -> VisualPlan:
        """Every visual token in every one of ``depth`` layers."""
        return cls(1.0, (1.0,) * depth)

    @property
    def is_identity(self) -> bool:
        """True when nothing is merged or pruned."""
        return self.merge_keep >= 1.0 and all(f >= 1.0 for f in self.fractions)

    def visual_counts(self, merged: int) -> list[int]:
        """Visual tokens entering each layer for a prompt with ``merged`` visual tokens after merging.

        Without :attr:`recycle`, ``fractions`` of ``merged``; with it, those plus the recycled tokens
        (:meth:`recycled_counts`).
        """
        return self._counts(merged)[0]

    def recycled_counts(self, merged: int) -> list[int]:
        """Per layer, the recycled tokens made by the removal just before it (0: none, or no removal there)."""
        return self._counts(merged)[1]

    def _counts(self, merged: int) -> tuple[list[int], list[int]]:
        selected = [count(f, merged) for f in self.fractions]
        if self.recycle is None:
            return selected, [0] * len(selected)
        # A removal where the selected count drops: the tokens entering the layer before it (recycled ones
        # included) compete, ``selected`` stay and ``recycle(pruned)`` recycled tokens hold (some of) the rest.
        totals, recycled = selected[:1], [0]
        for before, after in zip(selected[:-1], selected[1:], strict=True):
            made = 0
            if after < before:
                pruned = totals[-1] - after
                made = min(pruned, max(0, int(self.recycle(pruned))))
            if after < before and after + made < totals[-1]:
                totals.append(after + made)
                recycled.append(made)
            else:  # no removal here (or one that recycles every pruned token: the same tokens, skipped)
                totals.append(totals[-1])
                recycled.append(0)
        return totals, recycled


@dataclass(frozen=True)
class DecodeSelection:
    """Decode steps attend to part of the cached visual entries, reselected as decoding goes (DyCoke stage 2;
    :mod:`tokenprune.adapters.vlm.decode_selection` runs it).

    Attributes:
        layer: Softmax-attention layer whose attention from the new token ranks the eligible entries; the
            softmax-attention layers after it attend to the selection (and to every non-eligible token).
        keep: Fraction of each sample's eligible entries selected (rounded half up, :func:`count`).
        refresh: A step reselects where its scores' cosine similarity to the previous step's is below this
            (the first step always selects; above 1: every step).
    """

    layer: int
    keep: float
    refresh: float


@dataclass
class PreLLMConfig(VLMReductionConfig):
    """Options of methods that reduce each image's visual tokens before the LLM (how many an image keeps).

    Attributes:
        keep: Fraction of each image's visual tokens kept, in (0, 1]; the method's ``default_keep`` when none of
            ``keep``, ``tokens`` or ``flops`` is given. Give one of the three.
        tokens: Exact visual tokens kept per image, an int >= 1 (an image with fewer keeps all of them): the
            per-image count is known before the vision tower runs.
    """

    keep: float | None = None
    tokens: int | None = None
    #: ``keep`` when none of ``keep``, ``tokens``, ``flops`` is given (a class attribute, not an option).
    default_keep: ClassVar[float] = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [name for name in ("keep", "tokens", "flops") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of keep, tokens or flops, not {' and '.join(given)}")
        if self.keep is not None:
            self.keep = check_fraction("keep", self.keep, True)
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)):
            raise TypeError(f"tokens must be an int >= 1 (visual tokens kept per image), got {self.tokens!r}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"tokens must be an int >= 1 (visual tokens kept per image), got {self.tokens}")
        if not given:
            self.keep = self.default_keep


# ----------------------------------------------------------------------------- the method
class VisualTokenMethod(Method):
    """Base class of methods that reduce the visual tokens of a vision-language model.

    Subclasses implement :meth:`plan_for` and, if they prune inside the LLM, :meth:`importance`; if they act
    before the LLM, :meth:`merge` (and :meth:`merge_flops`). The adapter calls them; it never lets a method touch
    masks, positions or caches.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"vlm"})
    #: Which query rows :meth:`importance` reads (for FLOPs accounting): ``"last"``, ``"text"`` or ``"none"``.
    query_rows: ClassVar[str] = "last"
    #: The free parameter a FLOPs budget is solved for (a config field name).
    budget_parameter: ClassVar[str] = ""
    #: Vision-tower layer whose :class:`TowerSignals` :meth:`merge` reads (e.g. -2, the penultimate); None: none.
    tower_layer: ClassVar[int | None] = None
    #: Whether :meth:`merge` reads the instruction (``PreLLMContext.text``).
    reads_text: ClassVar[bool] = False
    #: Whether :meth:`importance` / :meth:`recycle` read what entered the LLM (``DecoderLayerContext.inputs``).
    reads_inputs: ClassVar[bool] = False
    #: Whether text tokens are prunable too (LazyLLM): every prompt token but structural ones and each sample's
    #: last may go; otherwise only visual tokens do.
    prunes_text: ClassVar[bool] = False
    #: Whether pruned tokens are revived at decode steps from an aux cache (an instance may resolve it per model).
    revives: bool = False
    #: Whether the method reduces whole videos along time (DyCoke): the adapter lays each video out as one span.
    whole_videos: ClassVar[bool] = False

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        """The plan for an LLM of ``depth`` layers; ``value`` overrides :attr:`budget_parameter`."""
        raise NotImplementedError

    def decode_selection(self) -> DecodeSelection | None:
        """How decode steps attend to part of the cached visual entries (None: to every one, the default)."""
        return None

    def decode_eligible(self, tokens: int) -> bool:
        """Whether a visual span of ``tokens`` tokens (after :meth:`merge`'s input layout) has entries that
        :meth:`decode_selection` ranks."""
        return True

    def validate(self, depth: int) -> None:
        """Raise if the config cannot work with an LLM of ``depth`` layers."""

    def check_model(self, adapter: Any) -> None:
        self.validate(adapter.depth)

    def candidates(self, visual: int) -> list[float]:
        """Values of :attr:`budget_parameter` a FLOPs budget may pick for a prompt with ``visual`` tokens."""
        return [c / visual for c in range(visual + 1)] if visual else [1.0]

    def merged_count(self, tokens: int, merge_keep: float) -> int:
        """Tokens one image of ``tokens`` visual tokens keeps before the LLM (at least one if it reduces)."""
        return tokens if merge_keep >= 1.0 else max(1, count(merge_keep, tokens))

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        """Matmul FLOPs (2 x MAC) of :meth:`merge` on one image of ``tokens`` down to ``keep`` tokens."""
        return 0.0

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        """Reduce each of the ``S`` spans of ``ctx.embeds`` ``(S, n, C)`` to ``ctx.keep`` tokens."""
        raise NotImplementedError(f"method {self.name!r} does not reduce visual tokens before the LLM")

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        """``(B, N)`` importance of every current token at a pruning layer (only visual entries are used)."""
        raise NotImplementedError(f"method {self.name!r} does not prune inside the LLM")

    def recycle(
        self, ctx: DecoderLayerContext, scores: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor
    ) -> Recycling:
        """Merge pruned tokens into ``counts[b]`` recycled tokens per sample (plans with a ``recycle`` rule).

        Args:
            ctx: The removing layer's context.
            scores: ``(B, N)`` what :meth:`importance` returned.
            keep: ``(B, N)`` tokens that stay (text, structural and the top selected visual tokens); the pruned
                ones are ``ctx.valid & ctx.visual & ~keep``.
            counts: ``(B,)`` long, recycled tokens each sample makes (at most its pruned count).
        """
        raise NotImplementedError(f"method {self.name!r} plans recycled tokens but does not make them")

    def pruning_flops(self, layer: int, visual: list[int], recycled: list[int], rows: int, channels: int) -> float:
        """Matmul FLOPs (2 x MAC) a removal after ``layer`` spends besides scoring ``rows`` query rows.

        Args:
            layer: The removing layer.
            visual: Visual tokens entering each layer (:meth:`VisualPlan.visual_counts`).
            recycled: Recycled tokens entering each layer (:meth:`VisualPlan.recycled_counts`).
            rows: Query rows scored.
            channels: Hidden size.
        """
        return 0.0

    def max_removable(self, reducible: int) -> int:
        return reducible

    def reduce(self, x, state, r, ctx):  # pragma: no cover - the ViT interface is not used by VLM adapters
        raise TypeError(f"method {self.name!r} reduces visual tokens of a vision-language model only")

    def solve_budget(self, fraction: float, depth: int, visual: int, cost: Callable[[VisualPlan], float]) -> VisualPlan:
        """The plan whose ``cost`` is closest to ``fraction`` of the unreduced cost (ties: fewer removed).

        ``cost`` grows with the budget parameter, so the candidates are bisected.

        Raises:
            ValueError: The budget is below what the method reaches.
        """
        values = self.candidates(visual)
        identity = VisualPlan.identity(depth)
        full = cost(identity)
        if fraction >= 1.0 or full <= 0:
            return identity

        def relative(i: int) -> float:
            return cost(self.plan_for(depth, values[i])) / full

        floor = relative(0)
        if floor > fraction + 1e-12:
            kind = "prunable" if self.prunes_text else "visual"
            raise ValueError(
                f"flops budget {fraction} is below what {self.name!r} reaches on this prompt "
                f"({visual} {kind} tokens; lowest: {floor:.3f}); valid budgets are in [{floor:.3f}, 1]"
            )
        low, high = 0, len(values) - 1  # relative(low) <= fraction < relative(high) (or high is the top)
        while high - low > 1:
            mid = (low + high) // 2
            if relative(mid) <= fraction:
                low = mid
            else:
                high = mid
        best = min((low, high), key=lambda i: (abs(relative(i) - fraction), -i))
        return self.plan_for(depth, values[best])


@dataclass
class TowerLayerConfig(PreLLMConfig):
    """:class:`PreLLMConfig` plus the vision-tower layer a method reads its signals from.

    Attributes:
        layer: Vision-tower layer whose attention and keys the method reads (negative: from the end); default
            None: the penultimate (LLaVA reads its features there, and the papers score there), or the only one
            of a one-layer tower.
    """

    layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"layer must be an int (a vision-tower layer index), got {self.layer!r}")


class PreLLMMethod(VisualTokenMethod):
    """Base of methods that only reduce each image before the LLM (a :class:`PreLLMConfig`): subclasses write
    :meth:`merge` and :meth:`merge_flops`; nothing is pruned inside the LLM."""

    query_rows: ClassVar[str] = "none"
    budget_parameter: ClassVar[str] = "keep"

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        if value is None and self.config.tokens is not None:
            return VisualPlan(0.0, (1.0,) * depth)  # below 1: reduce; merged_count gives the exact count
        return VisualPlan(self.config.keep if value is None else value, (1.0,) * depth)

    def merged_count(self, tokens: int, merge_keep: float) -> int:
        if self.config.tokens is not None:
            return min(self.config.tokens, tokens)
        return super().merged_count(tokens, merge_keep)


class TowerLayerMethod(PreLLMMethod):
    """A :class:`PreLLMMethod` that reads :class:`TowerSignals` of ``config.layer`` (a :class:`TowerLayerConfig`)."""

    tower_layer: ClassVar[int | None] = -2

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        # The layer the adapter captures (checked against the tower next): the configured one, or the default.
        default = -2 if len(adapter.tower_layer_list()) > 1 else -1
        self.tower_layer = default if self.config.layer is None else self.config.layer

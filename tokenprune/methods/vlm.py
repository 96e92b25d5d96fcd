"""The vision-language method contract: what a VLM method decides, and the typed contexts it decides from.

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
from typing import Any, ClassVar, NamedTuple

import torch

from tokenprune.config import ConfigOptions
from tokenprune.core.sequence import compact, gather_seq
from tokenprune.methods.base import Method


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


# ----------------------------------------------------------------------------- before the LLM
@dataclass
class TowerSignals:
    """What one vision-tower layer says about the visual tokens of ``S`` spans, one row per LLM token.

    Computed from the layer's own queries and keys (forward hooks), never from ``output_attentions``: the
    tower's attention stays fused. Where one LLM token stands for several patches (a patch merger, pixel
    shuffle), its entries are the mean over those patches.

    Attributes:
        layer: Tower layer index the signals come from.
        attention: ``(S, n)`` the attention the class token pays to each token's patches (towers with a class
            token), or the mean attention each token's patches receive from all patches (towers without one),
            averaged over heads.
        keys: ``(S, n, D)`` the layer's keys, averaged over heads.
        from_class_token: Which of the two ``attention`` is.
        groups: ``(S, n)`` long, when a ViT method merges inside the tower (``tokenprune.apply(vlm, "tome")``):
            which merged tower token holds each token's patch (equal ids: one group); None otherwise.
    """

    layer: int
    attention: torch.Tensor
    keys: torch.Tensor
    from_class_token: bool
    groups: torch.Tensor | None = None


class SpanReduction(NamedTuple):
    """What a pre-LLM method keeps of ``S`` spans: ``K`` tokens each.

    Attributes:
        index: ``(S, K)`` ascending position in the span each kept token is stored at.
        embeds: ``(S, K, C)`` the kept (possibly merged) embeddings.
        size: ``(S, K)`` original tokens each kept token stands for.
        group: ``(S, n)`` for every token of the span, which kept token (``0 .. K-1``) stands for it, -1 for a
            token dropped outright; None (methods that only select): the kept tokens stand for themselves.
    """

    index: torch.Tensor
    embeds: torch.Tensor
    size: torch.Tensor
    group: torch.Tensor | None = None

    def groups(self, n: int) -> torch.Tensor:
        """``(S, n)`` :attr:`group`, or the one a selection implies (kept: its rank, dropped: -1)."""
        if self.group is not None:
            return self.group
        group = torch.full((self.index.shape[0], n), -1, dtype=torch.long, device=self.index.device)
        ranks = torch.arange(self.index.shape[1], device=self.index.device).expand_as(self.index)
        return group.scatter(1, self.index, ranks)


@dataclass
class PreLLMContext:
    """``S`` visual spans of ``n`` tokens each (images, frames or crops of one size) about to enter the LLM.

    Attributes:
        embeds: ``(S, n, C)`` projected visual embeddings (what the LLM would read).
        keep: Tokens every span keeps.
        tower: Signals of the vision-tower layer the method asked for (``tower_layer``); None otherwise.
        text: ``(S, T, C)`` input embeddings of the instruction of each span's prompt (its text tokens after its
            first visual token, image-layout tokens excluded), right-aligned (fill rows first); only for methods
            that set ``reads_text`` (None otherwise).
        text_valid: ``(S, T)`` which rows of ``text`` are real (prompts differ in length).
    """

    embeds: torch.Tensor
    keep: int
    tower: TowerSignals | None = None
    text: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None

    def select(self, scores: torch.Tensor) -> SpanReduction:
        """Keep the ``keep`` highest ``scores`` ``(S, n)`` of every span, in spatial order, unmerged."""
        index = scores.topk(self.keep, dim=1).indices.sort(dim=1).values  # (S, K)
        embeds = self.embeds.gather(1, index[..., None].expand(-1, -1, self.embeds.shape[-1]))
        return SpanReduction(index, embeds, torch.ones_like(index, dtype=self.embeds.dtype))


# ----------------------------------------------------------------------------- inside the LLM
def instruction_mask(valid: torch.Tensor, visual: torch.Tensor, structural: torch.Tensor | None) -> torch.Tensor:
    """``(B, N)`` real text tokens after a sample's first visual token, image-layout tokens excluded."""
    text = valid & ~visual & (visual.long().cumsum(dim=1) > 0)
    return text if structural is None else text & ~structural


@dataclass
class LLMInputs:
    """What entered the LLM's first layer (after any merging before the LLM), for methods that set
    ``reads_inputs``. ``L`` slots.

    Attributes:
        embeds: ``(B, L, C)`` the first layer's input hidden states (the input embeddings).
        index: ``(B, L)`` input position of each slot (-1: fill).
        valid: ``(B, L)`` real tokens.
        visual: ``(B, L)`` visual tokens.
        structural: ``(B, L)`` image-layout tokens, or None.
    """

    embeds: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    structural: torch.Tensor | None = None


class Recycling(NamedTuple):
    """Pruned tokens a method merges into ``R`` recycled tokens at a removing layer (``B`` samples, ``N`` tokens).

    Each recycled token is stored at the slot of one of its members (it keeps that slot's rotary position) and
    stands for all its members (``size``: the sum of theirs; ``source``: theirs point to it).

    Attributes:
        group: ``(B, N)`` long, which recycled token (``0 .. R-1``) each current token is merged into; -1 for a
            token that is not (kept, text, or dropped outright). Only pruned visual tokens may be members.
        stored: ``(B, R)`` long, the slot each recycled token is stored at (a member of its group); -1 for ids a
            sample does not use (samples make different numbers, as :meth:`VisualPlan.recycled_counts` says).
        hidden: ``(B, R, C)`` the recycled tokens' hidden states (what the next layer reads).
    """

    group: torch.Tensor
    stored: torch.Tensor
    hidden: torch.Tensor


@dataclass
class DecoderLayerContext:
    """One pruning layer's view for a :class:`VisualTokenMethod`. Shapes: ``B`` samples, ``N`` current tokens.

    Attributes:
        layer: Layer index.
        queries: ``(B, H, N, D)`` the layer's queries before the rotary embedding (after q-norm, if it has one).
        keys: ``(B, Hkv, N, D)`` its keys before the rotary embedding (after k-norm, if it has one).
        position_embeddings: The ``(cos, sin)`` the layer used.
        valid: ``(B, N)`` real tokens (False: padding / fill).
        visual: ``(B, N)`` visual tokens.
        rope: The model's ``apply_rotary_pos_emb(q, k, cos, sin)``.
        scale: Softmax scale of the attention.
        structural: ``(B, N)`` image-layout tokens (kept like text, never query rows), or None.
        hidden: ``(B, N, C)`` the layer's output hidden states (what the next layer reads), or None.
        keep: ``(B,)`` visual tokens each sample keeps after this layer (the plan's count; the adapter keeps the
            top ``keep`` scores, less the recycled tokens the plan makes), or None.
        index: ``(B, N)`` input position of each current token (-1: fill), or None.
        inputs: What entered the first layer (:class:`LLMInputs`), for methods that set ``reads_inputs``; None
            otherwise.
        scored_rows: Query rows :meth:`attention_rows` scored (for FLOPs bookkeeping).
    """

    layer: int
    queries: torch.Tensor
    keys: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    valid: torch.Tensor
    visual: torch.Tensor
    rope: Callable
    scale: float
    structural: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    index: torch.Tensor | None = None
    inputs: LLMInputs | None = None
    scored_rows: int = field(default=0)

    @property
    def num_heads(self) -> int:
        return self.queries.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.queries.shape[-1]

    def last_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, row_valid)`` ``(B, 1)``: the last real token of every sample (the one that decodes next)."""
        positions = torch.arange(self.valid.shape[1], device=self.valid.device)
        rows = torch.where(self.valid, positions, -1).amax(dim=1, keepdim=True).clamp(min=0)
        return rows, self.valid.any(dim=1, keepdim=True)

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, row_valid)`` ``(B, T)``: real text tokens after a sample's first visual token."""
        return compact(instruction_mask(self.valid, self.visual, self.structural))

    def rotated_queries(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, D)`` the queries of ``rows`` ``(B, T)`` after the rotary embedding (as attention uses them)."""
        batch, t = rows.shape
        heads, dim = self.num_heads, self.head_dim
        cos, sin = self.position_embeddings
        q = self.queries.gather(2, rows[:, None, :, None].expand(batch, heads, t, dim))  # (B, H, T, D)
        return self.rope(q, q, gather_seq(cos, rows), gather_seq(sin, rows))[0]

    def rotated_keys(self) -> torch.Tensor:
        """``(B, Hkv, N, D)`` every key after the rotary embedding."""
        cos, sin = self.position_embeddings
        return self.rope(self.keys, self.keys, cos, sin)[0]

    def attention_rows(self, rows: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the query ``rows`` ``(B, T)`` over all current tokens, head-averaged.

        The layer's causal, padding-aware softmax, recomputed for these rows only in float32 from its own
        (rotary-embedded) queries and keys. Rows with ``row_valid`` False are zero.

        Returns:
            ``(B, T, N)``.
        """
        batch, n = self.valid.shape
        t, heads, kv_heads, dim = rows.shape[1], self.num_heads, self.num_kv_heads, self.head_dim
        self.scored_rows = max(self.scored_rows, t)
        q = self.rotated_queries(rows).float().view(batch, kv_heads, heads // kv_heads, t, dim)
        k = self.rotated_keys().float().transpose(-1, -2)  # (B, Hkv, D, N)
        positions = torch.arange(n, device=rows.device)
        allowed = self.valid[:, None, :] & (positions[None, None, :] <= rows[:, :, None])  # (B, T, N)
        probs = torch.zeros(batch, t, n, device=rows.device)
        for group in range(kv_heads):  # one key/value head at a time bounds memory to (B, G, T, N)
            logits = (q[:, group] @ k[:, group, None]) * self.scale  # (B, G, T, N)
            probs += logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).sum(dim=1)
        probs /= heads
        return torch.where((row_valid & allowed.any(dim=-1))[..., None], probs, torch.zeros((), device=rows.device))


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

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        """The plan for an LLM of ``depth`` layers; ``value`` overrides :attr:`budget_parameter`."""
        raise NotImplementedError

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
            raise ValueError(
                f"flops budget {fraction} is below what {self.name!r} reaches on this prompt "
                f"({visual} visual tokens; lowest: {floor:.3f}); valid budgets are in [{floor:.3f}, 1]"
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

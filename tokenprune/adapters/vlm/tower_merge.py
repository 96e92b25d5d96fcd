"""A ViT method inside a VLM's vision tower (``tokenprune.apply(llava, "tome", r=...)``): fewer tokens for the LLM.

The VLM adapter composes two patches when the method is a ViT :class:`~tokenprune.methods.base.Method` (not a
:class:`~tokenprune.methods.vlm.VisualTokenMethod`):

* **The tower**: the tower's own ViT adapter (``registry.find_adapter(vision_tower)``, e.g. CLIP, SigLIP, DINOv2)
  runs the method on a tower :class:`TowerRuntime` (``trace_source`` on; its ``enabled`` is the patch's, so
  ``tokenprune.disabled(vlm)`` reaches the tower). Its schedule is the tower's: ``r`` per tower layer, or ``flops``
  as a fraction of the **vision tower's** FLOPs (its ViT analytic table), not of the LLM prefill.
* **Full-size features for HF's code**: LLaVA reads ``hidden_states[vision_feature_layer]`` and scatters one
  projected feature into every placeholder. After the tower's forward, the hidden states the call asked for are
  rebuilt *unmerged*: every original token gets the feature of the merged token holding it (``hidden_states[k]``
  is the input of tower layer ``k``; ``k = depth`` the last layer's output). Only the requested entries are kept
  (the others are None, as HF's own selection leaves them), and the group of every token is recorded only at the
  feature layer (from ``TokenState.source``), so no per-layer source matrix is kept.
* **The LLM side**: the patch's runtime gets :class:`CollapseGroups`, a pre-LLM method that reads those groups
  (``TowerSignals.groups``, mapped onto placeholders by the family's ``tower_tokens``) and keeps one token per
  group per image, at the group's first placeholder (all members hold the same projected feature): the usual
  pre-LLM flow then follows masks, positions and the cache. Tokens per image are known before the tower runs
  (those left at the feature layer by the tower's schedule); with several feature layers (a list), the latest
  one's groups are used (they join the earlier ones' groups): a group's LLM token is then the mean of its
  members' projected features, which differ in the earlier layers' part.

FLOPs: the tower at its schedule (the ViT adapter's per-layer table, matching included), the projector on every
patch (it runs unmerged), the LLM on the collapsed tokens. Families declare ``tower_merging`` (and, if False,
``no_tower_merging``, the reason); the others raise NotImplementedError naming the families that work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tokenprune import registry
from tokenprune.adapters.base import linear_macs
from tokenprune.adapters.vlm.flops import tower_layers
from tokenprune.adapters.vlm.state import TowerSequence, VisualInputs
from tokenprune.adapters.vlm.tower import expand_rows, scatter_tokens
from tokenprune.methods.base import Method
from tokenprune.methods.vlm import PreLLMContext, SpanReduction, VisualPlan, VisualTokenMethod, VLMReductionConfig
from tokenprune.runtime import Runtime


class TowerRuntime(Runtime):
    """The tower's runtime; ``enabled`` is the patch runtime's (``owner``), so one switch turns both off."""

    #: Reducing tower layers may run under ``output_hidden_states``: :class:`TowerMerge` rebuilds them unmerged.
    unmerges_hidden_states = True

    def __init__(self, method: Method, config: Any, depth: int, num_protected: int, owner: Runtime) -> None:
        self._owner = owner  # before Runtime.__init__ sets ``enabled``
        super().__init__(method, config, depth, num_protected)

    @property
    def enabled(self) -> bool:
        return self._owner.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._owner.enabled = value


def feature_layers(selection: int | list[int], depth: int) -> list[int]:
    """Hidden-state indices ``0 .. depth`` a family's ``vision_feature_layer`` (an int or a list) selects."""
    chosen = [selection] if isinstance(selection, int) else list(selection)
    for k in chosen:
        if not -(depth + 1) <= k <= depth:
            raise ValueError(f"vision_feature_layer {k} is out of range for a tower of {depth} layers")
    return sorted({k % (depth + 1) for k in chosen})


def requested_states(value: Any, depth: int) -> set[int]:
    """Hidden-state indices a tower call's ``output_hidden_states`` asks for (True: all, an int or list: those)."""
    if value is None or value is False:
        return set()
    if value is True:
        return set(range(depth + 1))
    return set(feature_layers(value, depth))


def unmerge(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``(B, N, C)``: merged tokens ``x`` ``(B, N_k, C)`` spread back; ``groups`` ``(B, N)``: the one holding each."""
    return x.gather(1, groups[..., None].expand(-1, -1, x.shape[-1]))


def collapse_groups(embeds: torch.Tensor, groups: torch.Tensor, keep: int) -> SpanReduction:
    """One token per group of each span: the mean of its members' embeddings (identical ones when the projector
    reads one tower layer; with a list of layers, members differ in the earlier layers' features), stored at the
    group's first position, ``size`` its members in the span.

    Args:
        embeds: ``(S, n, C)`` span embeddings.
        groups: ``(S, n)`` any ids, equal for the members of a group.
        keep: Groups every span has.

    Returns:
        The :class:`SpanReduction` (``group``: the rank of each token's group, in order of first position).

    Raises:
        RuntimeError: A span has another number of groups than ``keep``.
    """
    spans, n = groups.shape
    positions = torch.arange(n, device=groups.device).expand(spans, n)
    width = int(groups.max()) + 1
    first = torch.full((spans, width), n, dtype=torch.long, device=groups.device)
    first = first.scatter_reduce(1, groups, positions, "amin")  # (S, width) first position of each id, n: absent
    present = (first < n).sum(dim=1)
    if not bool((present == keep).all()):
        raise RuntimeError(
            f"tokenprune: the vision tower left {present.tolist()} tokens per image, not the {keep} planned from "
            "its schedule (images of another size than the config's?)"
        )
    order = first.argsort(dim=1, stable=True)  # ids by first position, absent ones last
    index = first.gather(1, order[:, :keep])  # (S, K) ascending
    group = order.argsort(dim=1).gather(1, groups)  # (S, n) rank of each token's group
    size = torch.zeros(spans, keep, device=embeds.device).scatter_add(
        1, group, torch.ones_like(groups, dtype=torch.float)
    )
    sums = embeds.new_zeros(spans, keep, embeds.shape[-1], dtype=torch.float)
    sums = sums.scatter_add(1, group[..., None].expand(-1, -1, embeds.shape[-1]), embeds.float())  # (S, K, C)
    kept = (sums / size[..., None]).to(embeds.dtype)
    return SpanReduction(index, kept, size.to(embeds.dtype), group)


class CollapseGroups(VisualTokenMethod):
    """Pre-LLM side of a tower merge: the placeholders of one merged tower token become one LLM token.

    Args:
        name: The tower method's name (for messages).
        removed: Tokens of one image the tower merged away before the feature layer.
        tokens: Placeholders per image.
    """

    query_rows = "none"

    def __init__(self, name: str, removed: int, tokens: int) -> None:
        super().__init__(VLMReductionConfig())
        self.name = name
        self.removed = removed
        self.tokens = tokens

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        keep = 1.0 if self.removed == 0 else (self.tokens - self.removed) / self.tokens
        return VisualPlan(keep, (1.0,) * depth)

    def merged_count(self, tokens: int, merge_keep: float) -> int:
        return tokens if merge_keep >= 1.0 else tokens - self.removed

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        if ctx.tower is None or ctx.tower.groups is None:
            raise RuntimeError(
                f"tokenprune: {self.name!r} merges inside the vision tower, but the tower's run on these images was "
                "not seen (features passed in precomputed?); pass pixel_values"
            )
        return collapse_groups(ctx.embeds, ctx.tower.groups, ctx.keep)


def supported_families() -> list[str]:
    """Descriptions of the VLM adapters that run ViT methods inside their vision tower."""
    return [cls.description for cls, _ in registry.adapters("vlm") if getattr(cls, "tower_merging", False)]


class TowerMerge:
    """A ViT method run inside ``adapter``'s vision tower; rewires ``runtime`` (the patch's) to collapse groups.

    Made at apply time (``VLMAdapter.resolve_schedule``): the tower's schedule is resolved here, so an impossible
    one fails then. ``runtime.method`` becomes :class:`CollapseGroups` and ``runtime.config`` a VLM config without
    an LLM budget (``patch.config`` keeps the options given); the tower's own runtime is :attr:`runtime`.

    Attributes:
        tower_adapter: The tower's ViT adapter.
        runtime: The tower's :class:`TowerRuntime`.
        schedule: Tokens each tower layer removes (at the config's image size).
        layer: Hidden-state index whose groups the LLM side collapses (the latest feature layer).

    Raises:
        NotImplementedError: The family, or its tower, cannot run a method inside the tower.
    """

    def __init__(self, adapter: Any, runtime: Runtime) -> None:
        method, owner = runtime.method, type(adapter.model).__name__
        families = f"families that can: {supported_families()}"
        if not getattr(adapter, "tower_merging", False):
            raise NotImplementedError(
                f"method {method.name!r} merges tokens inside the vision tower; {owner} cannot: "
                f"{adapter.no_tower_merging}. {families}"
            )
        tower = adapter.vision_tower
        try:
            tower_cls = registry.find_adapter(tower)
        except TypeError:
            tower_cls = None
        if tower_cls is None or tower_cls.kind != "vit":
            raise NotImplementedError(
                f"method {method.name!r} merges tokens inside the vision tower; {owner}'s tower "
                f"({type(tower).__name__}) has no tokenprune ViT adapter (HF CLIP, SigLIP, DINOv2 have). {families}"
            )
        self.vlm = adapter
        self.tower_adapter = tower_cls(tower)
        if method.needs_class_token and not self.tower_adapter.has_class_token:
            raise ValueError(f"method {method.name!r} needs a class token; {type(tower).__name__} has none")
        method.check_model(self.tower_adapter)
        vision = adapter.model.config.vision_config
        size = runtime.config.input_size or vision.image_size  # the tower's images (a dynamic tower needs one)
        size = (size, size) if isinstance(size, int) else tuple(size)
        config = dataclasses.replace(runtime.config, trace_source=True, input_size=size)
        depth = self.tower_adapter.depth
        self.runtime = TowerRuntime(method, config, depth, self.tower_adapter.num_protected, runtime)
        self.schedule: list[int] = self.tower_adapter.resolve_schedule(self.runtime)
        self.num_tokens = self.tower_adapter.num_tokens(size)
        dropped = self.num_tokens - adapter.tokens_per_image()  # leading tower tokens the family leaves out
        if dropped > self.tower_adapter.num_protected:
            raise NotImplementedError(
                f"method {method.name!r} merges tokens inside the vision tower; {owner} leaves out the first "
                f"{dropped} tower token(s) of {type(tower).__name__}, which has {self.tower_adapter.num_protected} "
                "never-merged prefix token(s): a left-out patch may hold a merged group, so how many tokens an image "
                "keeps is not known before the tower runs (LLaVA: use vision_feature_select_strategy='full' with a "
                "tower without a class token)"
            )
        self.feature_layers = feature_layers(getattr(adapter.model.config, "vision_feature_layer", -1), depth)
        self.layer = self.feature_layers[-1]
        removed = sum(self.schedule[: self.layer])
        runtime.method = CollapseGroups(method.name, removed, adapter.tokens_per_image())
        runtime.config = VLMReductionConfig()
        self.runs: list[torch.Tensor] = []  # per tower run: (I, N) group of every token at ``layer``
        self._handles: list[Any] = []
        self._active = False
        self._keep: set[int] = set()
        self._records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: torch.Tensor | None = None

    # ----------------------------------------------------------------- install / remove
    def install(self) -> TowerMerge:
        """Install the tower's patch and the hooks that record and rebuild its hidden states; returns self."""
        self.tower_adapter.install(self.runtime)
        tower = self.vlm.vision_tower
        layers = tower_layers(tower)
        self._handles = [
            tower.register_forward_pre_hook(self._begin, with_kwargs=True),
            tower.register_forward_hook(self._finish),
            layers[0].register_forward_pre_hook(lambda module, args: self._record(0, args[0])),
        ]
        for index, layer in enumerate(layers):
            hook = self._after_layer(index + 1)
            self._handles.append(layer.register_forward_hook(hook))
        return self

    def remove(self) -> None:
        """Remove the hooks and the tower's patch (the original layers are back)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.tower_adapter.uninstall()
        self.runs, self._records, self._groups, self._active = [], {}, None, False

    def pop(self) -> list[torch.Tensor]:
        """The groups of every tower run since the last read, in order; clears them."""
        runs, self.runs = self.runs, []
        return runs

    # ----------------------------------------------------------------- one tower forward
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._records, self._groups = {}, None
        self._active = self.runtime.enabled
        if not self._active:
            return
        depth = self.tower_adapter.depth
        value = kwargs.get("output_hidden_states")
        if value is None:
            value = getattr(module.config, "output_hidden_states", False)
        self._keep = requested_states(value, depth)
        if value is not True and self._keep and max(self._keep) != self.layer:
            self._active = False
            raise NotImplementedError(
                f"tokenprune: this tower call asks for hidden states {sorted(self._keep)}; the tokens an image keeps "
                f"were planned from config.vision_feature_layer (hidden state {self.layer}): pass no other "
                "vision_feature_layer, or run that call inside tokenprune.disabled(model)"
            )

    def _after_layer(self, boundary: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._record(boundary, output[0] if isinstance(output, tuple) else output)

        return hook

    def _record(self, boundary: int, x: torch.Tensor) -> None:
        """Keep hidden state ``boundary`` (``x`` ``(B, N_k, C)``) and/or its groups, where this forward needs them."""
        if not self._active or (boundary != self.layer and boundary not in self._keep):
            return
        if boundary == 0:  # the first layer's input: nothing merged yet
            batch, n = x.shape[:2]
            groups = torch.arange(n, device=x.device).expand(batch, n)
        else:
            groups = self.runtime.state.source.argmax(dim=1)  # (B, N) merged token holding each original token
        if boundary == self.layer:
            self._groups = groups
        if boundary in self._keep:
            self._records[boundary] = (x, groups)

    def _finish(self, module: nn.Module, args: tuple, output: Any) -> Any:
        active, self._active = self._active, False
        if not active:
            return None
        if self._groups is not None:
            self.runs.append(self._groups)
        state = self.runtime.state
        if not self._keep or state is None or not state.reduced:
            return None  # HF's own hidden states are exact
        if not hasattr(output, "hidden_states"):
            raise NotImplementedError("tokenprune: call the patched vision tower with return_dict=True")
        rebuilt = [None] * (self.tower_adapter.depth + 1)
        for boundary, (x, groups) in self._records.items():
            rebuilt[boundary] = unmerge(x, groups)
        output.hidden_states = tuple(rebuilt)
        self._records = {}
        return output

    # ----------------------------------------------------------------- what the VLM adapter asks
    def sequence(self, found: VisualInputs, runs: list[torch.Tensor]) -> TowerSequence | None:
        """The groups of the latest tower ``runs`` scattered onto ``found``'s placeholders (None: no run matches).

        ``attention`` and ``keys`` are empty (zeros, ``D = 0``): a tower merge reads no tower signal.
        """
        placeholders = found.visual if found.structural is None else found.visual | found.structural
        for first in range(len(runs) - 1, -1, -1):  # the latest runs that account for these placeholders
            rows = expand_rows(self.vlm.tower_tokens(torch.cat(runs[first:])), placeholders)  # (n,)
            if rows is not None:
                break
        else:
            return None
        batch, length = placeholders.shape
        device = placeholders.device
        return TowerSequence(
            self.layer,
            torch.zeros(batch, length, device=device),
            torch.zeros(batch, length, 0, device=device),
            False,
            [0.0] * batch,
            groups=scatter_tokens(rows, placeholders),
        )

    def image_flops(self) -> float:
        """FLOPs of one image: the tower at its schedule (its ViT table, matching included) + the projector on
        every placeholder (the projector runs on the unmerged features)."""
        tower = self.tower_adapter.analytic_flops(self.num_tokens, self.schedule, self.runtime.method)["total"]
        return tower + 2.0 * self.vlm.tokens_per_image() * linear_macs(self.vlm.projector)

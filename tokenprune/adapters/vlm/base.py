"""The declared vision-language adapter: the hooks a family implements, and everything written once for all.

A family (``llava.py``, ``qwen2_vl.py``, ...) is one subclass of :class:`VLMAdapter` that says:

* :meth:`~VLMAdapter.parts`: where the inner model, vision tower, projector and language model are;
* :meth:`~VLMAdapter.find_visual`: the visual spans of each sample (and structural layout tokens), read from one
  call's inputs before the inner model scatters the image features;
* class data: ``position_axes`` (1-D positions, or 3 for M-RoPE), ``decoder`` (the decoder layer's attention
  layout, q/k-norm included), ``layout`` (for messages);
* its vision FLOPs: :meth:`~VLMAdapter.vision_flops` per image (towers of fixed size), or
  :meth:`~VLMAdapter.sample_vision_flops` / :meth:`~VLMAdapter.inputs_vision_flops` (dynamic resolution);
* optionally :meth:`~VLMAdapter.tower_tokens` (how tower patches map onto LLM tokens; towers of another layout
  override :meth:`~VLMAdapter.tower_capture` and :meth:`~VLMAdapter.tower_sequence`) so pre-LLM methods can read
  vision-tower signals, and :meth:`~VLMAdapter.decode_kwargs` (e.g. M-RoPE decode positions after merging).

Installation, label refusal, placeholder detection, schedule checks, the language-model side
(:class:`~tokenprune.adapters.vlm.reducer.DecoderReducer`) and the FLOPs tables are here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.adapters.base import Adapter, linear_macs
from tokenprune.adapters.vlm.flops import (
    DecoderFlops,
    sample_table,
    tower_has_class_token,
    tower_layers,
    vit_tower_flops,
)
from tokenprune.adapters.vlm.layer import DecoderSpec
from tokenprune.adapters.vlm.masks import check_decoder_attention
from tokenprune.adapters.vlm.reducer import DecoderReducer
from tokenprune.adapters.vlm.state import CacheSession, DecoderState, TowerSequence, VisualInputs
from tokenprune.adapters.vlm.tower import (
    ViTTowerCapture,
    attention_flops,
    expand_rows,
    patch_attention,
    per_sample_flops,
    scatter_tokens,
)
from tokenprune.adapters.vlm.tower_merge import TowerMerge
from tokenprune.core.sequence import split_runs
from tokenprune.methods.vlm import VisualTokenMethod


@dataclass(frozen=True)
class VLMParts:
    """Where a vision-language model keeps its pieces.

    Attributes:
        inner: The model whose forward scatters image features into the placeholders (``model.model``).
        vision_tower: The vision encoder.
        projector: What maps tower features to LLM embeddings (projector, merger, connector).
        language_model: The text model (``LlamaModel``, ``Qwen2Model``, ...): has ``layers``, ``config``.
    """

    inner: nn.Module
    vision_tower: nn.Module
    projector: nn.Module
    language_model: nn.Module


class VLMAdapter(Adapter):
    """Base of every vision-language family adapter (see the module docstring for the hooks)."""

    kind = "vlm"
    has_static_size = True
    has_class_token = False
    num_protected = 0
    #: Axes of the LLM's position ids: 1 (per-sample 1-D) or 3 (M-RoPE); compact merge positions need 1.
    position_axes: ClassVar[int] = 1
    #: Names inside the language model's decoder layers.
    decoder: ClassVar[DecoderSpec] = DecoderSpec()
    #: The layout this family expects, for messages.
    layout: ClassVar[str] = "transformers 5.x"
    #: Whether the family maps vision-tower signals onto LLM tokens (for pre-LLM methods with ``tower_layer``).
    tower_signals: ClassVar[bool] = False
    #: Whether a ViT method (e.g. ``tome``) may run inside the vision tower (:mod:`.tower_merge`); if not, why not.
    tower_merging: ClassVar[bool] = False
    no_tower_merging: ClassVar[str] = "its vision tower's features do not map one to one onto LLM tokens"
    #: Whether the family's adapter builds the masks of sliding-window attention layers itself (Gemma 3); a
    #: language model with ``"sliding_attention"`` layers is refused otherwise.
    sliding_attention: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        parts = self.parts()
        self.inner, self.vision_tower = parts.inner, parts.vision_tower
        self.projector, self.language_model = parts.projector, parts.language_model
        owner = type(model).__name__
        check_decoder_attention(self.language_model.config, owner)
        layers = self.language_model.layers
        for index, layer in enumerate(layers):
            missing = self.decoder.missing(layer)
            if missing:
                raise TypeError(
                    f"language-model layer {index} ({type(layer).__name__}) of {owner} is not the decoder layout "
                    f"tokenprune knows ({self.layout}): missing {missing}"
                )
        text_config = self.language_model.config
        if not self.sliding_attention and "sliding_attention" in (getattr(text_config, "layer_types", None) or []):
            raise NotImplementedError(
                f"{owner}'s language model uses sliding-window attention layers; tokenprune removes visual tokens "
                "in full-attention decoders only"
            )
        self.depth = len(layers)
        self.llm_flops = DecoderFlops(self.language_model, self.decoder)
        self.method: Any = None  # the installed method; kept after uninstall for FLOPs tables of its states
        self.reducer: DecoderReducer | None = None
        self._tower_capture: Any = None
        self._handles: list[Any] = []
        self.tower_merge: TowerMerge | None = None  # a ViT method inside the tower (kept for FLOPs tables)

    # ----------------------------------------------------------------- the family's hooks
    def parts(self) -> VLMParts:
        """Where the inner model, tower, projector and language model are."""
        raise NotImplementedError

    def tokens_per_image(self) -> int:
        """LLM tokens one image contributes (families of fixed size)."""
        raise NotImplementedError(f"{type(self.model).__name__} has no fixed number of visual tokens per image")

    def find_visual(self, input_ids: torch.Tensor | None, kwargs: dict) -> VisualInputs | None:
        """The visual tokens of one call (``kwargs``: the inner model's), or None to leave the call alone.

        Default: every ``config.image_token_id`` placeholder is visual; a run of them is split every
        :meth:`tokens_per_image` tokens into one span per image.
        """
        visual = self.visual_mask(input_ids, kwargs)
        if visual is None:
            return None
        return VisualInputs(visual, split_runs(visual, self.tokens_per_image()))

    def decode_kwargs(self, input_ids: torch.Tensor | None, kwargs: dict, session: CacheSession) -> dict | None:
        """Rewritten inner-model ``kwargs`` for a decode step on a compact cache, or None (no change)."""
        return None

    def vision_flops(self) -> float:
        """Vision tower + projector FLOPs for one image (ViT-layout towers of fixed size)."""
        tower = vit_tower_flops(self.vision_tower, self.vision_tower.config)
        return tower + 2.0 * self.tokens_per_image() * linear_macs(self.projector)

    def sample_vision_flops(self, state: DecoderState, sample: int) -> float:
        """Vision FLOPs of one sample of a reduced forward (default: one :meth:`vision_flops` per visual span)."""
        image = self.vision_flops() if self.tower_merge is None else self.tower_merge.image_flops()
        return len(state.spans[sample]) * image

    def inputs_vision_flops(self, inputs: dict) -> float:
        """Vision FLOPs of one unreduced call's keyword ``inputs`` (default: one image per ``pixel_values`` row)."""
        pixels = inputs.get("pixel_values")
        return (int(pixels.shape[0]) if pixels is not None else 0) * self.vision_flops()

    def static_image_flops(self) -> float:
        """Vision FLOPs per image in analytic tables of a prompt given without its inputs (0 where sizes vary)."""
        return self.vision_flops()

    def tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        """Map a per-patch signal ``(I, P, ...)`` of the tower's images to ``(n, ...)``, one row per placeholder.

        In the order HF scatters features into the placeholders. Families that implement it set
        :attr:`tower_signals`.
        """
        raise NotImplementedError

    def tower_layer_list(self) -> nn.ModuleList:
        """The vision tower's layers (``tower_layer`` indexes them)."""
        return tower_layers(self.vision_tower)

    def tower_capture(self, layer: int) -> Any:
        """What records the queries and keys of tower layer ``layer`` (default: a ViT-layout tower's)."""
        return ViTTowerCapture(self.vision_tower, layer)

    def tower_sequence(self, found: VisualInputs, runs: list) -> TowerSequence | None:
        """The signals of the latest tower ``runs`` (since the last forward), scattered onto ``found``'s placeholders.

        Earlier runs (the tower called on its own in between) are skipped. None when no run matches.
        """
        if self.tower_merge is not None:  # a ViT method inside the tower: its groups, no attention signals
            return self.tower_merge.sequence(found, runs)
        placeholders = found.visual if found.structural is None else found.visual | found.structural
        for first in range(len(runs) - 1, -1, -1):  # the latest runs that account for these placeholders
            queries = torch.cat([q for q, _ in runs[first:]])  # (I, H, P, D)
            images, heads, patches, dim = queries.shape
            ids = torch.arange(1, images + 1, dtype=torch.float32)[:, None].expand(images, patches)  # 0: layout
            owner = expand_rows(self.tower_tokens(ids).round().long() - 1, placeholders)  # (n,) image, -1: none
            if owner is not None:
                break
        else:
            return None  # no tower run matches (HF raises on such a call itself)
        keys = torch.cat([k for _, k in runs[first:]])
        has_class = tower_has_class_token(self.vision_tower)
        attention = expand_rows(self.tower_tokens(patch_attention(queries, keys, has_class)), placeholders)  # (n,)
        key_rows = expand_rows(self.tower_tokens(keys.float().mean(dim=1)), placeholders)  # (n, D)
        costs = torch.full((images,), attention_flops(patches, heads, dim, has_class))
        layer = self.reducer.runtime.method.tower_layer % len(self.tower_layer_list())
        return TowerSequence(
            layer,
            scatter_tokens(attention, placeholders),
            scatter_tokens(key_rows, placeholders),
            has_class,
            per_sample_flops(owner, placeholders, costs),
        )

    # ----------------------------------------------------------------- what apply() asks
    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        return self.tokens_per_image()

    def resolve_schedule(self, runtime: Any) -> list[float] | None:
        """Check the config against this family; the per-layer visual fractions (None for a FLOPs budget)."""
        if not isinstance(runtime.method, VisualTokenMethod):  # a ViT method: it runs inside the vision tower
            self.tower_merge = TowerMerge(self, runtime)  # resolves the tower's schedule, rewires ``runtime``
        config, method = runtime.config, runtime.method
        compact = getattr(config, "merge_positions", None) == "compact"
        if (
            self.position_axes > 1
            and compact
            and (config.flops is not None or method.plan_for(self.depth).merge_keep < 1)
        ):
            raise NotImplementedError(
                f"{method.name} merging on {type(self.model).__name__} needs merge_positions='original' (each merged "
                f"token keeps the {self.position_axes}-axis M-RoPE position of a token of its own image); "
                "merge_positions='compact' renumbers 1-D positions only (without reduction before the LLM, "
                "e.g. merge_keep=1.0, either works)."
            )
        if method.tower_layer is not None:
            self._check_tower(method)
        if getattr(config, "flops", None) is not None:
            return None
        return list(method.plan_for(self.depth).fractions)

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        self.method = runtime.method
        self.reducer = self.reducer_for(runtime)
        self.reducer.install()
        if runtime.method.tower_layer is not None:
            self._tower_capture = self.tower_capture(runtime.method.tower_layer)
        if self.tower_merge is not None:
            self._tower_capture = self.tower_merge.install()  # records groups per tower run, as a capture does
        self._handles = [
            self.inner.register_forward_pre_hook(self._before_inner, with_kwargs=True),
            self.inner.register_forward_hook(self._after_inner, always_call=True),
            self.model.register_forward_pre_hook(self._check_labels, with_kwargs=True),
        ]

    def reducer_for(self, runtime: Any) -> DecoderReducer:
        """The language-model side of this patch: a :class:`DecoderReducer`, or for a method that revives pruned
        tokens at decode steps (its ``revives``, LazyLLM's) the reducer with its aux cache
        (:class:`~tokenprune.adapters.decoder.revival.RevivingReducer`, the text-only decoders' own)."""
        args = (self.language_model, runtime, type(self.model).__name__, self.decoder, self.llm_flops)
        if not runtime.method.revives:
            return DecoderReducer(*args)
        from tokenprune.adapters.decoder.revival import RevivingReducer  # here: that package imports this one

        return RevivingReducer(*args, revive=True)

    def revival_refusal(self, layers: tuple[int, ...] = ()) -> str | None:
        """Why this family cannot revive tokens pruned after ``layers`` at decode steps (None: it can).

        Revival runs a revived token from its stored hidden state through the later layers beside the new one,
        under its own causal mask: every layer must be full causal attention over the cache, with masks tokenprune
        builds, and nothing but the layers may change hidden states after a pruning layer (Qwen3-VL's DeepStack
        adds vision features after its first layers, outside them).
        """
        levels = getattr(getattr(self.model.config, "vision_config", None), "deepstack_visual_indexes", None) or []
        if hasattr(self.language_model, "_deepstack_process") and layers and min(layers) < len(levels):
            return (
                f"its DeepStack adds vision features to visual tokens after layers 0..{len(levels) - 1}, which a token "
                f"pruned after layer {min(layers)} would miss when revived (prune after layer {len(levels)} or later)"
            )
        kinds = sorted(set(getattr(self.language_model.config, "layer_types", None) or []) - {"full_attention"})
        if kinds:
            return (
                f"its language model has {kinds} layers (a revived token cannot re-enter a sliding window or a "
                "recurrent state)"
            )
        if self.sliding_attention:
            return "its adapter builds its layers' masks itself (sliding windows, bidirectional image blocks)"
        return None

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._tower_capture is not None:
            self._tower_capture.remove()
            self._tower_capture = None
        if self.reducer is not None:
            self.reducer.uninstall()
            self.reducer = None

    def _before_inner(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        session = self.reducer.sessions.get(cache) if cache is not None else None
        if session is not None:
            rewritten = self.decode_kwargs(input_ids, kwargs, session)
            if rewritten is not None:
                return args, rewritten
        found = self.find_visual(input_ids, kwargs)
        if found is None:
            return None
        if self._tower_capture is not None:  # read at the LLM's entry: the tower ran before it (or in generate())
            found.tower = lambda: self.tower_sequence(found, self._tower_capture.pop())
        self.reducer.pending_visual = found
        return None

    def _after_inner(self, module: nn.Module, args: tuple, kwargs: Any, output: Any = None) -> None:
        if self.reducer is not None:
            self.reducer.pending_visual = None
        if self._tower_capture is not None:
            self._tower_capture.pop()  # runs of this forward are used or void now

    def _check_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        runtime = self.reducer.runtime
        if kwargs.get("labels") is not None and runtime.enabled:
            method = runtime.method
            if getattr(runtime.config, "flops", None) is not None or not method.plan_for(self.depth).is_identity:
                raise NotImplementedError(
                    "labels are not supported while visual tokens are reduced (the logits have one row per kept "
                    "token, see patch.state.index); run that call inside tokenprune.disabled(model)"
                )

    def visual_mask(
        self, input_ids: torch.Tensor | None, kwargs: dict, token_id: int | None = None
    ) -> torch.Tensor | None:
        """``(B, N)`` placeholder positions, from ids or (without ids) from the placeholder's embedding.

        ``token_id`` defaults to ``config.image_token_id`` (e.g. ``config.video_token_id`` for video placeholders).
        """
        token_id = self.model.config.image_token_id if token_id is None else token_id
        if input_ids is not None:
            return input_ids == token_id
        if kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            token = torch.full((), token_id, dtype=torch.long, device=embeds.device)
            return (embeds == self.inner.get_input_embeddings()(token)).all(dim=-1)
        return None

    # ----------------------------------------------------------------- vision-tower signals
    def _check_tower(self, method: Any) -> None:
        if not self.tower_signals:
            raise NotImplementedError(
                f"method {method.name!r} reads vision-tower signals (tower_layer={method.tower_layer}); "
                f"{type(self.model).__name__} does not expose them yet"
            )
        layers = self.tower_layer_list()
        if not -len(layers) <= method.tower_layer < len(layers):
            raise ValueError(
                f"method {method.name!r}: tower_layer={method.tower_layer} is out of range for a vision tower of "
                f"{len(layers)} layers (valid: {-len(layers)} .. {len(layers) - 1})"
            )

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def head_flops(self, num_tokens: int) -> float:
        return 2.0 * num_tokens * linear_macs(self.model.lm_head)

    def analytic_flops(
        self, num_tokens: int, schedule: list[int], method: Any = None, rows: int = 1, num_images: int = 1
    ) -> dict:
        """Per-layer FLOPs of one prompt: ``num_tokens`` entering the LLM, ``schedule[l]`` removed after layer ``l``.

        ``embed`` is vision tower + projector for ``num_images`` images (0 where image sizes vary: see
        :meth:`flops_for`), ``head`` the LM head on every output row, ``method_flops`` the scoring of ``rows``
        query rows at each removing layer.
        """
        tokens_in, tokens = [], num_tokens
        for removed in schedule:
            tokens_in.append(tokens)
            tokens -= removed
        tokens_out = [n - removed for n, removed in zip(tokens_in, schedule, strict=True)]
        table = self.llm_flops.rows(tokens_in, tokens_out, rows)
        embed, head = num_images * self.static_image_flops(), self.head_flops(tokens)
        return {"embed": embed, "head": head, "total": embed + head + sum(r["flops"] for r in table), "layers": table}

    def flops_for_inputs(self, inputs: dict) -> dict:
        """Analytic FLOPs table of one unreduced prompt given as ``model(**inputs)`` keyword inputs."""
        table = self.analytic_flops(int(inputs["input_ids"].shape[1]), [0] * self.depth, num_images=0)
        embed = self.inputs_vision_flops(inputs)
        return {**table, "embed": embed, "total": table["total"] + embed}

    def flops_for(self, state: DecoderState, sample: int = 0) -> dict:
        """Analytic FLOPs (2 x MAC) of one sample of a reduced forward, from ``patch.state``.

        ``embed``: vision tower and projector for the sample's images, plus reduction before the LLM;
        ``layers``: each LLM layer on the sample's tokens (+ the scoring product where tokens are removed);
        ``head``: the LM head on every output row. For a single unpadded prompt, ``total`` equals what
        ``torch.utils.flop_counter`` measures for ``model(**inputs)``.
        """
        table = sample_table(self.llm_flops, self.method, state, sample)
        signals = state.tower_flops[sample] if sample < len(state.tower_flops) else 0.0
        embed = self.sample_vision_flops(state, sample) + signals + table["merge"]
        layers = table["layers"]
        head = self.head_flops(layers[-1]["tokens_out"])
        total = embed + head + sum(row["flops"] for row in layers)
        return {"embed": embed, "merge": table["merge"], "head": head, "total": total, "layers": layers}

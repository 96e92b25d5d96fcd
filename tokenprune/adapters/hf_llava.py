"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (transformers 5.x, unforked).

``tokenprune.apply(llava, "fastv", k=2, keep=0.5)`` / ``tokenprune.apply(llava, "aim", merge_keep=0.25)`` (or
``flops=0.4``: fraction of the LLM prefill FLOPs, solved per prompt) patches the model in place; ``forward`` and
``generate()`` keep their signatures. What this file owns (the language-model side is
:mod:`tokenprune.adapters.hf_decoder`, shared with other VLM families):

* **Visual spans per sample** from ``input_ids == config.image_token_id`` (or, for ``inputs_embeds`` calls,
  embeddings equal to the image token's), read by a forward pre-hook on ``model.model`` (``LlavaModel``) before
  it scatters the image features into the placeholders. Every image is its own span (a run of placeholders
  is split every ``tokens_per_image``), so merging never mixes two images; batches may mix prompts, images
  per prompt and left or right padding.
* The vision tower and projector run unchanged (their FLOPs are counted in :meth:`analytic_flops`).
* ``labels`` are refused while reducing (logits are shorter than the labels; run that call inside
  ``tokenprune.disabled(model)``).

The vision tower itself is not reduced here: a ViT method on ``llava.model.vision_tower`` would hand the LLM
fewer features than placeholders (see ``hf_encoder``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import Adapter, linear_macs
from tokenprune.adapters.hf_decoder import DecoderReducer, check_decoder_attention
from tokenprune.registry import register_adapter


def _is_llava(model: Any) -> bool:
    module = sys.modules.get("transformers")
    if module is None or not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return False
    llava = getattr(module, "LlavaForConditionalGeneration", None)
    return llava is not None and isinstance(model, llava)


def visual_segments(visual: torch.Tensor, tokens_per_image: int | None) -> torch.Tensor:
    """``(B, L)`` image id of every visual token (unique per batch), -1 for text.

    A run of consecutive visual tokens is split into images of ``tokens_per_image`` tokens (the last piece may
    be shorter if the run is not a multiple); None keeps each run whole.
    """
    batch, length = visual.shape
    positions = torch.arange(length, device=visual.device).expand(batch, length)
    starts = visual.clone()
    starts[:, 1:] &= ~visual[:, :-1]
    run_start = torch.where(starts, positions, -1).cummax(dim=1).values
    run_id = starts.long().cumsum(dim=1)
    piece = (positions - run_start) // tokens_per_image if tokens_per_image else torch.zeros_like(positions)
    ids = (run_id * (length + 1) + piece) + torch.arange(batch, device=visual.device)[:, None] * (length + 1) ** 2
    return torch.where(visual, ids, -1)


class HFLlavaAdapter(Adapter):
    """``LlavaForConditionalGeneration`` with a Llama/Qwen2/Mistral-layout text model."""

    description = "transformers LlavaForConditionalGeneration (vision-language methods: fastv, aim)"
    kind = "vlm"
    has_static_size = True
    has_class_token = False
    num_protected = 0

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        llava = model.model
        self._attach(llava, llava.vision_tower, llava.multi_modal_projector, "Llama/Qwen2/Mistral, transformers 5.x")

    def _attach(
        self,
        inner: nn.Module,
        vision_tower: nn.Module,
        projector: nn.Module,
        layout: str,
        language_model: nn.Module | None = None,
    ) -> None:
        """Check the text model's decoder layout and read its sizes (shared by every VLM family here).

        ``language_model`` defaults to ``inner.language_model`` (Idefics3/SmolVLM call theirs ``text_model``).
        """
        model = self.model
        self.llava = inner
        self.language_model = inner.language_model if language_model is None else language_model
        self.vision_tower = vision_tower
        self.projector = projector
        check_decoder_attention(self.language_model.config, type(model).__name__)
        layers = self.language_model.layers
        for index, layer in enumerate(layers):
            attn = getattr(layer, "self_attn", None)
            missing = [n for n in ("self_attn", "mlp") if not hasattr(layer, n)]
            missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attn, n)]
            if missing:
                raise TypeError(
                    f"language-model layer {index} ({type(layer).__name__}) of {type(model).__name__} is not the "
                    f"decoder layout tokenprune knows ({layout}): missing {missing}"
                )
        text_config = self.language_model.config
        if "sliding_attention" in (getattr(text_config, "layer_types", None) or []):
            raise NotImplementedError(
                f"{type(model).__name__}'s language model uses sliding-window attention layers; tokenprune "
                "removes visual tokens in full-attention decoders only"
            )
        self.depth = len(layers)
        self.num_heads = text_config.num_attention_heads
        self.head_dim = layers[0].self_attn.head_dim
        self.reducer: DecoderReducer | None = None
        self._handles: list[Any] = []

    # ----------------------------------------------------------------- what apply() asks
    def resolve_schedule(self, runtime: Any) -> list[float] | None:
        """Check the method against this model; the per-layer visual fractions (None for a FLOPs budget)."""
        method = runtime.method
        if getattr(runtime.config, "flops", None) is not None:
            return None
        return list(method.plan_for(self.depth).fractions)

    def tokens_per_image(self) -> int:
        """Visual tokens one image contributes (patches, + the class token under the ``full`` strategy)."""
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        full = self.model.config.vision_feature_select_strategy == "full"
        return patches + (1 if full else 0)

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        return self.tokens_per_image()

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        self.reducer = DecoderReducer(self.language_model, runtime, type(self.model).__name__)
        self.reducer.install()
        self._handles = [
            self.llava.register_forward_pre_hook(self._find_visual, with_kwargs=True),
            self.llava.register_forward_hook(self._forget_visual, always_call=True),
            self.model.register_forward_pre_hook(self._check_labels, with_kwargs=True),
        ]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.reducer is not None:
            self.reducer.uninstall()
            self.reducer = None

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
            return (embeds == self.llava.get_input_embeddings()(token)).all(dim=-1)
        return None

    def _find_visual(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        visual = self.visual_mask(kwargs.get("input_ids", args[0] if args else None), kwargs)
        if visual is None:
            return
        self.reducer.pending_visual = (visual, visual_segments(visual, self.tokens_per_image()))

    def _forget_visual(self, module: nn.Module, args: tuple, kwargs: Any, output: Any = None) -> None:
        if self.reducer is not None:
            self.reducer.pending_visual = None

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def tower_flops(self) -> float:
        """FLOPs of one ``image_size`` image through a ViT-layout vision tower (CLIP, SigLIP, Idefics3, DINOv2)."""
        config = self.vision_tower.config
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # CLIP / SigLIP layout
        embeddings = tower.embeddings
        patch_embedding = next(m for m in embeddings.modules() if isinstance(m, nn.Conv2d))
        patches = (config.image_size // config.patch_size) ** 2
        # Prefix tokens: CLIP's class embedding, DINOv2's class token and (with registers) register tokens.
        prefix = int(hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token"))
        prefix += int(getattr(config, "num_register_tokens", 0) or 0)
        tokens = patches + prefix
        flops = 2.0 * patches * patch_embedding.weight.numel()
        heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer  # CLIP / DINOv2
        for layer in layers:
            flops += 2.0 * tokens * linear_macs(layer)  # attention projections + MLP
            flops += 4.0 * tokens * tokens * heads * head_dim
        return flops

    def vision_flops(self) -> float:
        """Vision tower + projector FLOPs for one image."""
        return self.tower_flops() + 2.0 * self.tokens_per_image() * linear_macs(self.projector)

    def sample_vision_flops(self, state: Any, sample: int) -> float:
        """Vision FLOPs of one sample of a reduced forward (here: one :meth:`vision_flops` per visual span)."""
        return len(state.spans[sample]) * self.vision_flops()

    def flops_for_inputs(self, inputs: dict) -> dict:
        """Analytic FLOPs table of one unreduced prompt given as ``model(**inputs)`` keyword inputs."""
        pixels = inputs.get("pixel_values")
        num_images = int(pixels.shape[0]) if pixels is not None else 0
        return self.analytic_flops(int(inputs["input_ids"].shape[1]), [0] * self.depth, num_images=num_images)

    def embed_flops(self, num_tokens: int) -> float:
        return self.vision_flops()

    def layer_flops(self, layer: int, tokens_in: int, tokens_out: int) -> float:
        # A layer runs whole on its input; removal happens after it (its MLP sees tokens_in too).
        return self._reducer_like().layer_flops(layer, tokens_in)

    def head_flops(self, num_tokens: int) -> float:
        return 2.0 * num_tokens * linear_macs(self.model.lm_head)

    def analytic_flops(
        self, num_tokens: int, schedule: list[int], method: Any = None, rows: int = 1, num_images: int = 1
    ) -> dict:
        """Per-layer FLOPs of one prompt: ``num_tokens`` entering the LLM, ``schedule[l]`` removed after layer ``l``.

        ``embed`` is vision tower + projector for ``num_images`` images, ``head`` the LM head on every output
        row, ``method_flops`` the scoring of ``rows`` query rows at each removing layer.
        """
        reducer = self._reducer_like()
        table, tokens = [], num_tokens
        for layer, removed in enumerate(schedule):
            overhead = reducer.score_flops(rows, tokens) if removed > 0 else 0.0
            flops = reducer.layer_flops(layer, tokens) + overhead
            table.append(
                {
                    "layer": layer,
                    "tokens_in": tokens,
                    "tokens_out": tokens - removed,
                    "flops": flops,
                    "method_flops": overhead,
                }
            )
            tokens -= removed
        embed, head = num_images * self.vision_flops(), self.head_flops(tokens)
        return {"embed": embed, "head": head, "total": embed + head + sum(r["flops"] for r in table), "layers": table}

    def flops_for(self, state: Any, sample: int = 0) -> dict:
        """Analytic FLOPs (2 x MAC) of one sample of a reduced forward, from ``patch.state``.

        ``embed``: vision tower and projector for the sample's images, plus merging before the LLM;
        ``layers``: each LLM layer on the sample's tokens (+ the scoring product where tokens are removed);
        ``head``: the LM head on every output row. For a single unpadded prompt, ``total`` equals what
        ``torch.utils.flop_counter`` measures for ``model(**inputs)``.
        """
        table = self._reducer_like().sample_flops(state, sample)
        embed = self.sample_vision_flops(state, sample) + table["merge"]
        head = self.head_flops(table["layers"][-1]["tokens_out"])
        layers = table["layers"]
        total = embed + head + sum(row["flops"] for row in layers)
        return {"embed": embed, "merge": table["merge"], "head": head, "total": total, "layers": layers}

    def _reducer_like(self) -> DecoderReducer:
        if self.reducer is not None:
            return self.reducer
        return DecoderReducer(self.language_model, _NoRuntime(), type(self.model).__name__)


class _NoRuntime:
    """Stand-in runtime for FLOPs tables of an unpatched model."""

    method = None
    config = None
    enabled = False
    state = None


register_adapter(_is_llava, HFLlavaAdapter, HFLlavaAdapter.description)

"""The Pixtral-tower families (transformers 5.x): ``Mistral3ForConditionalGeneration`` (a Pixtral vision tower, a
2 x 2 patch merger, Mistral) and Pixtral-12B's ``LlavaForConditionalGeneration`` with a Pixtral tower (no merger:
one LLM token per patch, LLaVA's MLP projector, the same ``[IMG_BREAK]``/``[IMG_END]`` layout).

Every VLM method (``tokenprune.methods(kind="vlm")``) patches the model in place; ``forward`` and ``generate()``
keep their signatures. The language-model side (real removal, masks, compact KV cache, decode) is
:mod:`tokenprune.adapters.vlm`; this file owns the image layout and the Pixtral tower.

Pixtral encodes every image at its own size (``image_sizes``; ``pixel_values`` is padded to the largest): an
image of ``h x w`` patches becomes ``(h / 2) x (w / 2)`` LLM tokens after the patch merger (each one the 2 x 2
block of patches it folds, row-major). The processor writes one image as its rows, each ended by a layout token::

    [IMG] x w/2 [IMG_BREAK]  ...  [IMG] x w/2 [IMG_END]      (h/2 rows; the last one ends with [IMG_END])

What this file owns:

* **Visual tokens are the ``[IMG]`` placeholders** (``config.image_token_id``, or for ``inputs_embeds`` calls
  embeddings equal to its embedding); HF writes image features onto them only.
* **``[IMG_BREAK]`` / ``[IMG_END]`` are structural**: kept like text, never merged or pruned, and not query rows
  of text-to-visual importance. They are the token right after each row of placeholders (the model config does
  not name their ids; the processor always writes one there). Why kept: each is one learned embedding, the same
  at every row end; it holds no image content to rank, and it is how the LLM reads the grid's rows and where an
  image stops (the role of LLaVA-OneVision's ``image_newline``, :mod:`.llava_onevision`).
* **Spans**: every image is one span (its placeholders, straddling its own row-end tokens), so merging never
  mixes two images; images are told apart by their token counts, from ``image_sizes`` (a forward) or from the
  encoded features ``generate()`` passes as ``mm_encoder_outputs``.
* **Vision-tower signals** (for ``visionzip`` / ``vispruner``): Pixtral has no class token, so a token's
  attention is the mean attention its 2 x 2 patches receive, and its key their head-averaged keys' mean (as
  :mod:`.idefics3` does for its pixel shuffle). Pixtral runs all images of a call as one sequence under a
  block-diagonal mask: the signals are computed per image, on queries and keys taken *after* Pixtral's 2-D
  rotary embedding (as its attention uses them) by :class:`PixtralTowerCapture`.
* FLOPs: the tower runs ``patch_conv`` on every padded image, then its layers on all images of the call as one
  sequence (the block-diagonal mask still computes every pair); a sample's share is its images run as one call.
* ``labels`` are refused while reducing, as for LLaVA.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.capture import QKCapture, split_heads
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.state import DecoderState, TowerSequence, VisualInputs
from tokenprune.adapters.vlm.tower import (
    attention_flops,
    expand_rows,
    patch_attention,
    per_sample_flops,
    scatter_tokens,
)
from tokenprune.registry import register_adapter

Grid = tuple[int, int]  # (rows, columns) of patches


def row_ends(placeholders: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: the token right after each run of ``placeholders`` (``[IMG_BREAK]`` / ``[IMG_END]``)."""
    ends = torch.zeros_like(placeholders)
    ends[:, 1:] = placeholders[:, :-1] & ~placeholders[:, 1:]
    return ends


def image_segments(placeholders: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """``(B, L)`` image index of every placeholder (in HF's row-major scatter order), -1 elsewhere.

    ``counts``: placeholders of each image, in order. Without them (or when they disagree with the placeholders,
    where HF raises itself) every group of rows written back to back (runs one layout token apart) is one image.
    """
    if counts and sum(counts) == int(placeholders.sum()):
        rank = placeholders.flatten().long().cumsum(0) - 1  # (B * L,)
        bounds = torch.tensor(counts, device=placeholders.device).cumsum(0)
        segment = torch.searchsorted(bounds, rank, right=True).view_as(placeholders)
        return torch.where(placeholders, segment, -1)
    before = torch.zeros_like(placeholders)
    before[:, 1:] = placeholders[:, :-1]
    two_before = torch.zeros_like(placeholders)
    two_before[:, 2:] = placeholders[:, :-2]
    starts = placeholders & ~before & ~two_before  # the first row of a group
    return torch.where(placeholders, starts.flatten().long().cumsum(0).view_as(placeholders) - 1, -1)


def merged_mean(signal: torch.Tensor, grid: Grid, merge: int) -> torch.Tensor:
    """``(h * w, ...)`` per patch -> ``(h/merge * w/merge, ...)`` per LLM token: the mean of each merged block.

    Row-major blocks, as the patch merger's ``unfold`` folds them (an odd last row or column is dropped, as there).
    """
    rows, cols = grid
    blocks = signal.unflatten(0, (rows, cols))[: rows // merge * merge, : cols // merge * merge]
    blocks = blocks.unflatten(0, (rows // merge, merge)).unflatten(2, (cols // merge, merge))  # (h', m, w', m, ...)
    return blocks.mean(dim=(1, 3)).flatten(0, 1)


def patch_grids(image_sizes: Any, patch: int) -> list[Grid]:
    """The ``(rows, columns)`` patch grid of each image of ``image_sizes`` (``(I, 2)`` pixels, or pairs)."""
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes)
    return [(int(h) // patch, int(w) // patch) for h, w in sizes]


@dataclass
class TowerRun:
    """One run of the Pixtral tower at the captured layer.

    Attributes:
        queries: ``(H, S, D)`` rotary-embedded queries of every patch of every image of the run, images in order.
        keys: ``(H, S, D)`` likewise.
        grids: ``(rows, columns)`` patches of each image.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    grids: list[Grid]


class PixtralTowerCapture:
    """Records one Pixtral layer's queries and keys, rotated by the 2-D RoPE as its attention rotates them."""

    def __init__(self, tower: nn.Module, layer: int) -> None:
        attn = pixtral_layers(tower)[layer].attention
        for name in ("q_proj", "k_proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} has no {name!r}: not the Pixtral attention tokenprune knows")
        self.patch = tower.patch_size
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self._capture = QKCapture(attn.q_proj, attn.k_proj, split_heads(attn.num_heads, attn.head_dim))
        self._grids: list[Grid] = []
        self.runs: list[TowerRun] = []
        self._handles = [
            tower.register_forward_pre_hook(self._on_tower, with_kwargs=True),
            attn.register_forward_pre_hook(self._arm, with_kwargs=True),
            attn.register_forward_hook(self._on_attention, with_kwargs=True),
        ]

    def _on_tower(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        if sizes is None:  # HF: every image fills its tensor
            sizes = [tuple(pixels.shape[-2:])] * pixels.shape[0]
        self._grids = patch_grids(sizes, self.patch)

    def _arm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._capture.active = True

    def _on_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._capture.active = False
        queries, keys = self._capture.pop()  # (1, H, S, D) each: every image of the call in one sequence
        rotary = kwargs.get("position_embeddings")
        if queries is None or keys is None or rotary is None:
            return
        queries, keys = self.rope(queries, keys, *rotary, unsqueeze_dim=0)  # as PixtralAttention rotates them
        self.runs.append(TowerRun(queries[0], keys[0], self._grids))

    def pop(self) -> list[TowerRun]:
        """Every run since the last read, in order; clears them."""
        runs, self.runs = self.runs, []
        return runs

    def remove(self) -> None:
        self._capture.remove()
        for handle in self._handles:
            handle.remove()
        self.runs = []


def pixtral_layers(tower: nn.Module) -> nn.ModuleList:
    """The layers of a Pixtral vision tower (``transformer.layers``), or our error naming what is missing."""
    layers = getattr(getattr(tower, "transformer", None), "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(tower).__name__} has no 'transformer.layers': not the Pixtral vision tower tokenprune knows"
        )
    return layers


class Mistral3Adapter(VLMAdapter):
    """``Mistral3ForConditionalGeneration``: Pixtral tower at each image's size, 2 x 2 patch merger, row-end tokens."""

    description = "transformers Mistral3ForConditionalGeneration (Pixtral tower)"
    layout = "transformers 5.x Mistral3 (Pixtral)"
    has_static_size = False
    tower_signals = True
    no_tower_merging = (
        "its vision tower is Pixtral's own (2-D RoPE, images of any size in one sequence; no tokenprune ViT adapter) "
        "and its patch merger folds 2 x 2 patches into each LLM token"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.merge_size = getattr(model.config, "spatial_merge_size", 1)  # 1: no patch merger (Pixtral-12B)
        self.patch_size = model.config.vision_config.patch_size
        # Per sample of the last prefill that ran the tower: its images' patch grids, and the padded canvas.
        self._grids: list[list[Grid]] = []
        self._canvas: Grid = (0, 0)

    def parts(self) -> VLMParts:
        inner = self.model.model  # ``Mistral3Model``
        for name in ("vision_tower", "multi_modal_projector", "language_model"):
            if not hasattr(inner, name):
                raise TypeError(f"{type(inner).__name__} has no {name!r}: not the {self.layout} layout")
        return VLMParts(inner, inner.vision_tower, inner.multi_modal_projector, inner.language_model)

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        """``[IMG]`` placeholders (visual LLM tokens) of one image of ``input_size`` ``(height, width)``."""
        if input_size is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} encodes images at their own size: give input_size=(height, width)"
            )
        unit = self.patch_size * self.merge_size
        return (input_size[0] // unit) * (input_size[1] // unit)

    # ----------------------------------------------------------------- the layout
    def image_counts(self, kwargs: dict) -> list[int] | None:
        """Placeholders of each image of one call, from ``image_sizes`` or from encoded features; None if neither."""
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None and isinstance(encoded.pooler_output, (list, tuple)):  # e.g. from generate()
            return [int(f.shape[0]) for f in encoded.pooler_output]
        pixels = kwargs.get("pixel_values")
        if pixels is None or kwargs.get("image_sizes") is None:
            return None
        grids = patch_grids(kwargs["image_sizes"], self.patch_size)
        return [(h // self.merge_size) * (w // self.merge_size) for h, w in grids]

    def find_visual(self, input_ids: torch.Tensor | None, kwargs: dict) -> VisualInputs | None:
        placeholders = self.visual_mask(input_ids, kwargs)  # (B, L) every [IMG]
        if placeholders is None:
            return None
        counts = self.image_counts(kwargs)
        segments = image_segments(placeholders, counts)
        if bool(placeholders.any()):  # a prefill with images: per sample, the grids the tower runs on (FLOPs)
            self._record_grids(placeholders, segments, kwargs)
        return VisualInputs(placeholders, segments, row_ends(placeholders))

    def _record_grids(self, placeholders: torch.Tensor, segments: torch.Tensor, kwargs: dict) -> None:
        self._grids, self._canvas = [[] for _ in range(placeholders.shape[0])], (0, 0)
        pixels = kwargs.get("pixel_values")
        if pixels is None or kwargs.get("image_sizes") is None:
            return  # the tower ran before this forward (generate()), or HF raises
        grids = patch_grids(kwargs["image_sizes"], self.patch_size)
        self._canvas = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        for sample, row in enumerate(segments.cpu()):
            self._grids[sample] = [grids[i] for i in torch.unique(row[row >= 0]).tolist() if i < len(grids)]

    # ----------------------------------------------------------------- vision-tower signals
    def tower_layer_list(self) -> nn.ModuleList:
        return pixtral_layers(self.vision_tower)

    def tower_capture(self, layer: int) -> PixtralTowerCapture:
        return PixtralTowerCapture(self.vision_tower, layer)

    def tower_sequence(self, found: VisualInputs, runs: list[TowerRun]) -> TowerSequence | None:
        """Mean attention each patch receives within its own image, and keys, per LLM token (2 x 2 patch mean).

        The latest run whose images account for ``found``'s placeholders (``generate()`` with beams repeats
        each prompt's rows, see :func:`~tokenprune.adapters.vlm.tower.expand_rows`).
        """
        placeholders = found.visual
        for run in reversed(runs):
            attention, keys, owner, costs = self._run_tokens(run)
            rows = [expand_rows(t, placeholders) for t in (attention, keys, owner)]
            if all(t is not None for t in rows):
                break
        else:
            return None  # no tower run matches (HF raises on such a call itself)
        layer = self.reducer.runtime.method.tower_layer % len(self.tower_layer_list())
        return TowerSequence(
            layer,
            scatter_tokens(rows[0], placeholders),
            scatter_tokens(rows[1], placeholders),
            False,
            per_sample_flops(rows[2], placeholders, costs),
        )

    def _run_tokens(self, run: TowerRun) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per LLM token of one run: attention ``(n,)``, keys ``(n, D)``, image ``(n,)``; per image the FLOPs."""
        heads, _, dim = run.queries.shape
        attention, keys, owner, costs, start = [], [], [], [], 0
        for image, (rows, cols) in enumerate(run.grids):
            end = start + rows * cols  # the image's block of the block-diagonal mask: attention stays inside it
            received = patch_attention(run.queries[None, :, start:end], run.keys[None, :, start:end], False)[0]
            attention.append(merged_mean(received, (rows, cols), self.merge_size))  # (n_i,)
            keys.append(merged_mean(run.keys[:, start:end].float().mean(dim=0), (rows, cols), self.merge_size))
            owner.append(torch.full((attention[-1].shape[0],), image))
            costs.append(attention_flops(end - start, heads, dim, False))
            start = end
        return torch.cat(attention), torch.cat(keys), torch.cat(owner), torch.tensor(costs)

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def vision_flops(self, grids: list[Grid] | None = None, canvas: Grid | None = None) -> float:
        """Tower + projector FLOPs of one call on images of these patch ``grids``, padded to ``canvas`` patches.

        ``patch_conv`` runs on each padded image; every layer runs on all ``S`` patches as one sequence
        (``4 S^2 H D`` for the block-diagonal attention, which computes every pair); the projector (norm, patch
        merger, MLP) on each merged token.
        """
        if grids is None or canvas is None:
            raise NotImplementedError("Mistral3 vision FLOPs depend on the image sizes: pass their patch grids")
        tower, merge = self.vision_tower, self.merge_size
        patches = sum(h * w for h, w in grids)
        tokens = sum((h // merge) * (w // merge) for h, w in grids)
        flops = 2.0 * len(grids) * canvas[0] * canvas[1] * tower.patch_conv.weight.numel()
        for layer in pixtral_layers(tower):
            flops += 2.0 * patches * linear_macs(layer) + 4.0 * patches * patches * layer.attention.embed_dim
        return flops + 2.0 * tokens * linear_macs(self.projector)

    def static_image_flops(self) -> float:
        return 0.0  # image sizes vary per prompt: flops_for counts the tower from a forward

    def inputs_vision_flops(self, inputs: dict) -> float:
        """The tower on every image of one call (``pixel_values`` and ``image_sizes``)."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return 0.0
        canvas = tuple(pixels.shape[-2:])
        sizes = inputs.get("image_sizes")
        grids = patch_grids([canvas] * pixels.shape[0] if sizes is None else sizes, self.patch_size)
        return self.vision_flops(grids, (canvas[0] // self.patch_size, canvas[1] // self.patch_size))

    def sample_vision_flops(self, state: DecoderState, sample: int) -> float:
        """The sample's images as one tower call on the forward's padded canvas (0 when the tower ran before it)."""
        grids = self._grids[sample] if sample < len(self._grids) else []
        return self.vision_flops(grids, self._canvas) if grids else 0.0


class PixtralLlavaAdapter(Mistral3Adapter):
    """``LlavaForConditionalGeneration`` with a Pixtral tower (Pixtral-12B): Mistral3's layout, one token per patch.

    HF's LLaVA takes every Pixtral token of the feature layer as an LLM token (``vision_feature_select_strategy``
    ``"full"``: Pixtral has no class token to drop), so the image layout is Mistral3's with a merge size of 1.
    """

    description = "transformers LlavaForConditionalGeneration with a Pixtral vision tower (Pixtral-12B)"
    layout = "transformers 5.x LLaVA (Pixtral tower)"
    no_tower_merging = (
        "its vision tower is Pixtral's own (2-D RoPE, images of any size in one sequence; no tokenprune ViT adapter)"
    )

    def __init__(self, model: nn.Module) -> None:
        strategy = model.config.vision_feature_select_strategy
        if strategy != "full":
            raise TypeError(
                f"tokenprune: a LLaVA model with a Pixtral tower must use vision_feature_select_strategy='full' "
                f"(Pixtral has no class token; {strategy!r} would drop an image patch); got {strategy!r}"
            )
        super().__init__(model)  # LlavaConfig has no spatial_merge_size: each Pixtral patch is one [IMG] token


def has_pixtral_tower(model: nn.Module) -> bool:
    """Whether a LLaVA model's vision config is Pixtral's (Pixtral-12B's layout, not CLIP/SigLIP's)."""
    return getattr(getattr(model.config, "vision_config", None), "model_type", None) == "pixtral"


def pixtral_llava(model: nn.Module) -> bool:
    return hf_classes("LlavaForConditionalGeneration")(model) and has_pixtral_tower(model)


register_adapter(hf_classes("Mistral3ForConditionalGeneration"), Mistral3Adapter, Mistral3Adapter.description)
register_adapter(pixtral_llava, PixtralLlavaAdapter, PixtralLlavaAdapter.description)

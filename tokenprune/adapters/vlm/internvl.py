"""``InternVLForConditionalGeneration`` (transformers 5.x): dynamic tiles plus a thumbnail, pixel shuffle.

Every VLM method (``tokenprune.methods(kind="vlm")``) patches the model in place; ``forward`` and ``generate()``
keep their signatures. The language-model side (real removal, masks, compact KV cache, decode) is
:mod:`tokenprune.adapters.vlm`.

InternVL's processor cuts an image into a grid of ``image_size`` tiles (dynamic resolution), plus a downscaled
thumbnail of the whole image when there is more than one tile; every tile goes through the InternViT tower
alone (``pixel_values`` is ``(tiles, 3, H, W)``, the tiles of all images of the batch in order). The tower
prepends a class token (``embeddings.cls_token``), HF drops its feature (``vision_feature_select_strategy=
"default"``), and the pixel shuffle (``downsample_ratio`` 0.5) folds each 2 x 2 block of patches into one LLM
token: ``(H / p) (W / p) r^2`` tokens per tile, in the row-major order of the shuffled grid. The processor writes
an image as ``<img>`` + ``<IMG_CONTEXT>`` x tokens x tiles + ``</img>`` (a video frame as ``FrameN: <img> ...
</img>``).

What this file owns:

* **Only ``<IMG_CONTEXT>`` placeholders are visual** (``config.image_token_id``). ``<img>``, ``</img>`` and
  any text around tiles (``FrameN:``) are real text: never removed or merged.
* **Spans**: every tile is its own span (a run of placeholders is split every tile's token count), so merging
  never mixes two tiles, or a tile and the thumbnail.
* **Tower signals** for pre-LLM methods (visionzip, vispruner): the class token's attention to each patch and
  each patch's key, from the tower layer's own queries and keys (after InternViT's optional q/k RMSNorm, what
  its attention uses), averaged over the 2 x 2 patches of each LLM token.
* The tower and projector run unchanged, once per tile; their FLOPs are counted in the analytic tables.
* ``labels`` are refused while reducing, as for LLaVA.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.capture import QKCapture, split_heads
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.flops import tower_layers
from tokenprune.adapters.vlm.tower import ViTTowerCapture
from tokenprune.registry import register_adapter


class InternViTCapture(ViTTowerCapture):
    """Queries and keys ``(I, H, P + 1, D)`` of one InternViT layer, per run (class token first).

    InternViT names its attention ``attention`` and normalises queries and keys after the projections
    (``q_norm`` / ``k_norm``, an ``nn.Identity`` without ``use_qk_norm``): the hooks read the normalised ones.
    """

    def __init__(self, tower: nn.Module, layer: int) -> None:
        attn = tower_layers(tower)[layer].attention
        heads = tower.config.num_attention_heads
        self._capture = QKCapture(attn.q_norm, attn.k_norm, split_heads(heads, tower.config.hidden_size // heads))
        self._capture.active = True
        self.runs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = attn.register_forward_hook(self._keep)


def pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    """``(height, width)`` of an InternViT ``image_size`` / ``patch_size`` (an int or a pair)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def internvit_flops(tower: nn.Module) -> float:
    """One tile through InternViT: patch convolution, then every layer on the patches + the class token."""
    config = tower.config
    (height, width), (patch_h, patch_w) = pair(config.image_size), pair(config.patch_size)
    patches = (height // patch_h) * (width // patch_w)
    tokens = patches + 1  # the class token
    flops = 2.0 * patches * tower.embeddings.patch_embeddings.projection.weight.numel()
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for layer in tower_layers(tower):
        flops += 2.0 * tokens * linear_macs(layer)  # q, k, v, output projections + MLP
        flops += 4.0 * tokens * tokens * heads * head_dim  # QK^T and AV
    return flops


class InternVLAdapter(VLMAdapter):
    """``InternVLForConditionalGeneration`` (InternViT tower, pixel-shuffle projector, Qwen2/Llama text model)."""

    description = "transformers InternVLForConditionalGeneration"
    tower_signals = True
    no_tower_merging = "its pixel shuffle mixes 4 neighbouring patches into each LLM token"
    layout = "transformers 5.x InternVL (Qwen2/Llama text model)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise NotImplementedError(
                f"{type(model).__name__} with vision_feature_select_strategy={strategy!r}: tokenprune supports "
                "'default' (the class token's feature dropped before the pixel shuffle, as InternVL uses it)"
            )
        for name in ("embeddings", "encoder"):
            if not hasattr(self.vision_tower, name):
                raise TypeError(
                    f"the vision tower of {type(model).__name__} ({type(self.vision_tower).__name__}) has no "
                    f"{name!r}: not the InternViT layout tokenprune knows ({self.layout})"
                )

    def parts(self) -> VLMParts:
        inner = self.model.model  # ``InternVLModel``
        for name in ("vision_tower", "multi_modal_projector", "language_model"):
            if not hasattr(inner, name):
                raise TypeError(
                    f"{type(inner).__name__} has no {name!r}: not the InternVL layout tokenprune knows "
                    "(transformers 5.x InternVLModel)"
                )
        return VLMParts(inner, inner.vision_tower, inner.multi_modal_projector, inner.language_model)

    def _scale(self) -> int:
        """Patches folded along each side into one LLM token (``1 / downsample_ratio``)."""
        return int(round(1 / self.model.config.downsample_ratio))

    def tokens_per_image(self) -> int:
        """LLM tokens of one tile: ``(H / p) (W / p) downsample_ratio^2`` (after the pixel shuffle)."""
        vision = self.model.config.vision_config
        (height, width), (patch_h, patch_w) = pair(vision.image_size), pair(vision.patch_size)
        return (height // patch_h) * (width // patch_w) // self._scale() ** 2

    def vision_flops(self) -> float:
        """InternViT + projector FLOPs of one tile."""
        return internvit_flops(self.vision_tower) + 2.0 * self.tokens_per_image() * linear_macs(self.projector)

    def tower_capture(self, layer: int) -> InternViTCapture:
        return InternViTCapture(self.vision_tower, layer)

    def tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        # (I, 1 + side * side, ...): HF drops the class token, then the pixel shuffle folds each scale x scale
        # block of patches into one LLM token, blocks in row-major order -> the mean over each block.
        scale = self._scale()
        patches = signal[:, 1:]
        side = int(round(patches.shape[1] ** 0.5))
        blocks = patches.unflatten(1, (side // scale, scale, side // scale, scale))
        return blocks.mean(dim=(2, 4)).flatten(0, 2)  # (I * tokens_per_image, ...)


register_adapter(hf_classes("InternVLForConditionalGeneration"), InternVLAdapter, InternVLAdapter.description)

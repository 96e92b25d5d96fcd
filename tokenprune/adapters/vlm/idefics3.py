"""``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration`` (transformers 5.x).

Every VLM method (``tokenprune.methods(kind="vlm")``) patches the model in place; ``forward`` and ``generate()``
keep their signatures. The language-model side (real removal, masks, compact KV cache, decode) is
:mod:`tokenprune.adapters.vlm`.

Idefics3 (and SmolVLM, the same layout) splits an image into sub-images (a grid of tiles plus a downscaled
global view); each goes through the SigLIP-style vision tower alone, and the pixel-shuffle connector folds
``scale_factor**2`` neighbouring patches into one token: ``image_seq_len`` tokens per sub-image, in the
row-major order of the shuffled grid. The processor writes them between text tokens::

    <fake_token_around_image><row_1_col_1><image> x image_seq_len ... \\n ...
    <fake_token_around_image><global-img><image> x image_seq_len<fake_token_around_image>

What this file owns:

* **Only ``<image>`` placeholders are visual** (``input_ids == config.image_token_id``, or for
  ``inputs_embeds`` calls embeddings equal to that token's). The tile labels (``<row_i_col_j>``,
  ``<global-img>``), ``<fake_token_around_image>`` and newlines are real text: never removed, and read as text
  query rows by AIM's importance like any other prompt text.
* **Spans**: every sub-image is its own span (a run of placeholders is split every ``image_seq_len``), so AIM
  merges within one sub-image's grid only, never across tiles or between a tile and the global view.
* The vision tower and connector run unchanged, once per real sub-image (HF drops all-zero padding images);
  their FLOPs are counted in the analytic tables.
* ``labels`` are refused while reducing, as for LLaVA.
"""

from __future__ import annotations

import torch

from tokenprune.adapters.base import hf_classes
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.registry import register_adapter


class Idefics3Adapter(VLMAdapter):
    """``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``: sub-images, pixel shuffle."""

    description = "transformers Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration"
    tower_signals = True
    no_tower_merging = "its pixel-shuffle connector mixes 4 neighbouring patches into each LLM token"
    layout = "transformers 5.x Idefics3/SmolVLM"

    def parts(self) -> VLMParts:
        inner = self.model.model  # ``Idefics3Model`` / ``SmolVLMModel``
        return VLMParts(inner, inner.vision_model, inner.connector, inner.text_model)

    def tokens_per_image(self) -> int:
        """LLM tokens of one sub-image: ``(image_size / patch_size)**2 / scale_factor**2`` (after pixel shuffle)."""
        return self.inner.image_seq_len

    def inputs_vision_flops(self, inputs: dict) -> float:
        """The vision tower runs once per real (not all-zero) sub-image."""
        pixels = inputs.get("pixel_values")  # (B, sub-images, C, H, W), padded with all-zero images
        sub_images = int((pixels != 0).flatten(2).any(dim=-1).sum()) if pixels is not None else 0
        return sub_images * self.vision_flops()

    def tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        # The connector's pixel shuffle folds each scale x scale block of patches into one LLM token, blocks in
        # row-major order: (I, side * side, ...) -> (I, side / s, s, side / s, s, ...) -> mean over each block.
        scale = self.inner.connector.scale_factor
        side = int(round(signal.shape[1] ** 0.5))
        blocks = signal.unflatten(1, (side // scale, scale, side // scale, scale))
        return blocks.mean(dim=(2, 4)).flatten(0, 2)  # (I * n, ...)


register_adapter(
    hf_classes("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    Idefics3Adapter,
    Idefics3Adapter.description,
)

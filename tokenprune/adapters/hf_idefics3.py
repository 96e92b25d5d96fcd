"""Adapter for Hugging Face ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration`` (5.x).

``tokenprune.apply(idefics3, "fastv", k=2, keep=0.5)`` / ``tokenprune.apply(idefics3, "aim", merge_keep=0.25)``
patches the model in place; ``forward`` and ``generate()`` keep their signatures. The language-model side (real
removal, masks, compact KV cache, decode) is :mod:`tokenprune.adapters.hf_decoder`, shared with LLaVA.

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

import sys
from typing import Any

from torch import nn

from tokenprune.adapters.base import Adapter
from tokenprune.adapters.hf_llava import HFLlavaAdapter
from tokenprune.registry import register_adapter

_CLASSES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")


def _is_idefics3(model: Any) -> bool:
    module = sys.modules.get("transformers")
    if module is None or not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return False
    classes = tuple(c for c in (getattr(module, name, None) for name in _CLASSES) if c is not None)
    return bool(classes) and isinstance(model, classes)


class HFIdefics3Adapter(HFLlavaAdapter):
    """``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``: sub-images, pixel shuffle."""

    description = (
        "transformers Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration "
        "(vision-language methods: fastv, aim)"
    )

    def __init__(self, model: nn.Module) -> None:  # noqa: D107 - the same layout checks as LLaVA
        Adapter.__init__(self, model)
        inner = model.model  # ``Idefics3Model`` / ``SmolVLMModel``
        self._attach(inner, inner.vision_model, inner.connector, "transformers 5.x Idefics3/SmolVLM", inner.text_model)

    def tokens_per_image(self) -> int:
        """LLM tokens of one sub-image: ``(image_size / patch_size)**2 / scale_factor**2`` (after pixel shuffle)."""
        return self.llava.image_seq_len

    def flops_for_inputs(self, inputs: dict) -> dict:
        """Analytic FLOPs of one unreduced prompt; the vision tower runs once per real (not all-zero) sub-image."""
        pixels = inputs.get("pixel_values")  # (B, sub-images, C, H, W), padded with all-zero images
        sub_images = int((pixels != 0).flatten(2).any(dim=-1).sum()) if pixels is not None else 0
        return self.analytic_flops(int(inputs["input_ids"].shape[1]), [0] * self.depth, num_images=sub_images)


register_adapter(_is_idefics3, HFIdefics3Adapter, HFIdefics3Adapter.description)

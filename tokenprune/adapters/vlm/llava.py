"""``LlavaForConditionalGeneration`` (transformers 5.x, unforked): one image = one span of fixed size.

Visual spans per sample come from ``input_ids == config.image_token_id`` (or, for ``inputs_embeds`` calls,
embeddings equal to the image token's), read before ``LlavaModel`` scatters the image features; a run of
placeholders is split every ``tokens_per_image``, so merging never mixes two images. Batches may mix prompts,
images per prompt and left or right padding. The vision tower and projector run unchanged (their FLOPs are
counted). Vision-tower signals: the CLIP/SigLIP tower's patches map one to one onto LLM tokens (the class token
is dropped under the ``default`` feature strategy, kept under ``full``).
"""

from __future__ import annotations

import torch

from tokenprune.adapters.base import hf_classes
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.flops import tower_has_class_token
from tokenprune.adapters.vlm.mistral3 import has_pixtral_tower
from tokenprune.registry import register_adapter


class LlavaAdapter(VLMAdapter):
    """``LlavaForConditionalGeneration`` with a Llama/Qwen2/Mistral-layout text model."""

    description = "transformers LlavaForConditionalGeneration"
    tower_signals = True
    tower_merging = True
    layout = "Llama/Qwen2/Mistral, transformers 5.x"

    def parts(self) -> VLMParts:
        inner = self.model.model  # ``LlavaModel``
        return VLMParts(inner, inner.vision_tower, inner.multi_modal_projector, inner.language_model)

    def _full_strategy(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "full"

    def tokens_per_image(self) -> int:
        """Visual tokens one image contributes: every tower token under ``full``; all but the first (the class
        token of CLIP/DINOv2, a patch of SigLIP) under ``default``, as HF's ``get_image_features`` slices them."""
        vision = self.model.config.vision_config
        prefix = int(tower_has_class_token(self.vision_tower)) + int(getattr(vision, "num_register_tokens", 0) or 0)
        return (vision.image_size // vision.patch_size) ** 2 + prefix - int(not self._full_strategy())

    def tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        # (I, P + prefix, ...) -> (I * tokens_per_image, ...): HF drops the first tower token under "default".
        return signal[:, 0 if self._full_strategy() else 1 :].flatten(0, 1)


def clip_style_llava(model: torch.nn.Module) -> bool:
    """A LLaVA model whose tower is not Pixtral's (a Pixtral tower is :mod:`.mistral3`'s layout)."""
    return hf_classes("LlavaForConditionalGeneration")(model) and not has_pixtral_tower(model)


register_adapter(clip_style_llava, LlavaAdapter, LlavaAdapter.description)

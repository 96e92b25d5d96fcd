"""Adapter for Hugging Face ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection`` (transformers 5.x).

``CLIPModel``: apply to its vision tower, ``tokenprune.apply(clip_model.vision_model, ...)`` (a
``CLIPVisionModel``); ``clip_model(...)`` and ``clip_model.get_image_features(...)`` then run reduced, the
text tower is untouched, and ``count_flops(clip_model.vision_model, images)`` counts the image side.
``CLIPModel`` itself is not accepted: it needs text inputs, and only its vision tower has image tokens.

Token 0 is the class token and is never reduced; ``pooler_output`` (``post_layernorm`` of token 0) and
``image_embeds`` stay well defined, ``last_hidden_state`` has fewer tokens. ``CLIPForImageClassification``
averages the patch tokens without sizes and is not supported. A LLaVA vision tower is a
``CLIPVisionModel``: see ``hf_encoder`` for why a patched one refuses LLaVA's ``hidden_states`` request.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vit.hf_encoder import HFEncoderAdapter, HFLayerSpec
from tokenprune.adapters.vit.reducing import PreNormParts
from tokenprune.registry import register_adapter

# CLIP and SigLIP share this layer layout.
CLIP_STYLE_SPEC = HFLayerSpec(
    parts=PreNormParts(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", mlp="mlp"),
    scale_attr="scale",
    heads_attr="num_heads",
)


class HFCLIPVisionAdapter(HFEncoderAdapter):
    """``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``."""

    description = (
        "transformers CLIPVisionModel / CLIPVisionModelWithProjection (CLIPModel: apply to clip_model.vision_model)"
    )
    spec = CLIP_STYLE_SPEC

    def find_encoder(self, model: nn.Module) -> nn.Module:
        return model.vision_model if hasattr(model, "vision_model") else model

    def find_layers(self, encoder: nn.Module) -> nn.ModuleList:
        return encoder.encoder.layers

    def patch_projection(self) -> nn.Conv2d:
        return self.encoder.embeddings.patch_embedding

    def prefix_tokens(self, config: Any) -> int:
        return 1

    def head_flops(self, num_tokens: int) -> float:
        # post_layernorm has no matmul; the projection (if any) sees the class token only.
        projection = getattr(self.model, "visual_projection", None)
        return 2.0 * linear_macs(projection) if projection is not None else 0.0


register_adapter(
    hf_classes("CLIPVisionModel", "CLIPVisionModelWithProjection"),
    HFCLIPVisionAdapter,
    HFCLIPVisionAdapter.description,
)

"""Adapter for Hugging Face ``ViTModel`` and ``ViTForImageClassification`` (transformers 5.x).

Token 0 is the class token and is never reduced; ``ViTPooler`` and the classification head read only
token 0, so ``pooler_output`` and ``logits`` stay well defined. ``last_hidden_state`` has fewer tokens when
reduced. ``ViTForMaskedImageModeling`` reshapes the tokens back into a grid and is not supported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vit.hf_encoder import HFEncoderAdapter, HFLayerSpec
from tokenprune.adapters.vit.reducing import PreNormParts
from tokenprune.registry import register_adapter

_SPEC = HFLayerSpec(
    parts=PreNormParts(
        norm1="layernorm_before", attn="attention", norm2="layernorm_after", mlp="mlp", drop1="dropout", drop2="dropout"
    ),
    scale_attr="scaling",
    heads_attr="num_attention_heads",
)


class HFViTAdapter(HFEncoderAdapter):
    """``ViTModel`` (with or without pooler) and ``ViTForImageClassification``."""

    description = "transformers ViTModel / ViTForImageClassification"
    spec = _SPEC

    def find_encoder(self, model: nn.Module) -> nn.Module:
        return model.vit if hasattr(model, "vit") else model

    def find_layers(self, encoder: nn.Module) -> nn.ModuleList:
        return encoder.layers

    def patch_projection(self) -> nn.Conv2d:
        return self.encoder.embeddings.patch_embeddings.projection

    def prefix_tokens(self, config: Any) -> int:
        return 1

    def head_flops(self, num_tokens: int) -> float:
        # Pooler and classifier each see the class token only.
        pooler = getattr(self.encoder, "pooler", None)
        flops = 2.0 * linear_macs(pooler) if pooler is not None else 0.0
        classifier = getattr(self.model, "classifier", None)
        return flops + (2.0 * linear_macs(classifier) if classifier is not None else 0.0)


register_adapter(hf_classes("ViTModel", "ViTForImageClassification"), HFViTAdapter, HFViTAdapter.description)

"""Adapter for Hugging Face ``Dinov2Model`` and ``Dinov2WithRegistersModel`` (transformers 5.x).

The class token and any register tokens (``config.num_register_tokens``) are never reduced, so
``pooler_output`` (token 0) is well defined; ``last_hidden_state`` has fewer tokens when reduced. LayerScale
and drop-path are the layer's own modules. DINOv2 interpolates its position embeddings to any input size,
so a FLOPs budget needs ``input_size=(H, W)``. The classification and backbone heads
(``Dinov2ForImageClassification`` averages patch tokens without sizes, ``Dinov2Backbone`` reshapes them to
a grid) are not supported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenprune.adapters.base import hf_classes
from tokenprune.adapters.vit.hf_encoder import HFEncoderAdapter, HFLayerSpec
from tokenprune.adapters.vit.reducing import PreNormParts
from tokenprune.registry import register_adapter

_SPEC = HFLayerSpec(
    parts=PreNormParts(
        norm1="norm1",
        attn="attention",
        norm2="norm2",
        mlp="mlp",
        scale1="layer_scale1",
        drop1="drop_path",
        scale2="layer_scale2",
        drop2="drop_path",
    ),
    scale_attr="scaling",
    heads_attr="num_attention_heads",
)


class HFDinov2Adapter(HFEncoderAdapter):
    """``Dinov2Model`` and ``Dinov2WithRegistersModel``."""

    description = "transformers Dinov2Model / Dinov2WithRegistersModel"
    spec = _SPEC
    has_static_size = False

    def find_layers(self, encoder: nn.Module) -> nn.ModuleList:
        return encoder.encoder.layer

    def patch_projection(self) -> nn.Conv2d:
        return self.encoder.embeddings.patch_embeddings.projection

    def prefix_tokens(self, config: Any) -> int:
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)

    def head_flops(self, num_tokens: int) -> float:
        return 0.0  # final layernorm and a class-token pooler: no matmul


register_adapter(hf_classes("Dinov2Model", "Dinov2WithRegistersModel"), HFDinov2Adapter, HFDinov2Adapter.description)

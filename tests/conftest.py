"""Shared model factories: small random-weight timm ViTs covering every form the adapter supports."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

torch.set_num_threads(2)

# name -> (factory, input size (H, W), extra apply() options)
MODELS = {
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False), (224, 224), {}),
    "dinov2_dynamic": (
        lambda: timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=224, dynamic_img_size=True, depth=6
        ),
        (224, 224),
        {"input_size": 224},
    ),
    "reg4_qknorm_layerscale": (
        lambda: VisionTransformer(
            img_size=64,
            patch_size=8,
            embed_dim=96,
            depth=4,
            num_heads=3,
            reg_tokens=4,
            qk_norm=True,
            init_values=0.1,
        ),
        (64, 64),
        {},
    ),
    "no_cls_avg": (
        lambda: VisionTransformer(
            img_size=64,
            patch_size=8,
            embed_dim=96,
            depth=4,
            num_heads=3,
            class_token=False,
            global_pool="avg",
        ),
        (64, 64),
        {},
    ),
    "no_cls_map": (
        lambda: VisionTransformer(
            img_size=64,
            patch_size=8,
            embed_dim=96,
            depth=4,
            num_heads=3,
            class_token=False,
            global_pool="map",
        ),
        (64, 64),
        {},
    ),
    "cls_avgmax_unfused": (
        lambda: VisionTransformer(
            img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, global_pool="avgmax", fc_norm=False
        ),
        (64, 64),
        {"unfused": True},
    ),
}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """A fresh eval-mode model, a batch of 2 inputs and the apply() options it needs."""
    factory, (height, width), options = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    options = dict(options)
    if options.pop("unfused", False):
        for block in model.blocks:
            block.attn.fused_attn = False
    # Random init leaves the class token and LayerScale tiny; perturb so every path matters.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    return model, images, options


@pytest.fixture(params=sorted(MODELS))
def model_name(request) -> str:
    return request.param

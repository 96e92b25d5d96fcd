"""Every ViT model form the ViT adapters support: how to build a tiny random-weight one, and its outputs.

timm ``VisionTransformer`` forms (class token or none, registers, LayerScale, qk-norm, dynamic image size,
avg / map / avgmax pooling, unfused attention) and Hugging Face encoders (ViT, CLIP, SigLIP, DINOv2 with and
without registers), all built from configs: nothing is downloaded. Random init leaves class tokens and
LayerScale tiny, so every parameter is perturbed: every path matters. A new form is one entry in ``FORMS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import timm
import torch
import transformers as hf
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class ViTForm:
    """A model form.

    Attributes:
        factory: Builds the model (called under ``torch.manual_seed(0)``).
        size: Input ``(H, W)``.
        depth: Transformer blocks.
        has_class_token: Whether the form has a class token (methods with ``needs_class_token`` refuse it).
        options: Extra apply() options the form needs (e.g. ``input_size`` for dynamic-size models).
        attn: Attention implementations to compare (Hugging Face forms); empty for timm.
        unfused: timm: run the blocks' unfused attention path.
        budgets: FLOPs budgets the form's schedule can reach.
    """

    factory: Callable[[], torch.nn.Module]
    size: tuple[int, int]
    depth: int
    has_class_token: bool
    options: dict = field(default_factory=dict)
    attn: tuple[str, ...] = ()
    unfused: bool = False
    budgets: tuple[float, ...] = (0.8, 0.65)

    @property
    def hf(self) -> bool:
        return bool(self.attn)


def _timm(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, **kwargs)


SIZE, PATCH, DIM, DEPTH, HEADS = 64, 8, 64, 4, 4  # Hugging Face forms: 64 patches (+ prefix), 4 layers of 4 heads
VISION = dict(hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS)
VISION.update(image_size=SIZE, patch_size=PATCH)
DINO = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH)
HF_ATTN = ("sdpa", "eager")

FORMS: dict[str, ViTForm] = {
    # timm
    "deit_tiny": ViTForm(
        lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False), (224, 224), 12, True, budgets=(0.8, 0.5)
    ),
    "dinov2_dynamic": ViTForm(
        lambda: timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=224, dynamic_img_size=True, depth=6
        ),
        (224, 224),
        6,
        True,
        {"input_size": 224},
        budgets=(0.8, 0.5),
    ),
    "reg4_qknorm_layerscale": ViTForm(_timm(reg_tokens=4, qk_norm=True, init_values=0.1), (64, 64), 4, True),
    "no_cls_avg": ViTForm(_timm(class_token=False, global_pool="avg"), (64, 64), 4, False),
    "no_cls_map": ViTForm(_timm(class_token=False, global_pool="map"), (64, 64), 4, False),
    "cls_avgmax_unfused": ViTForm(_timm(global_pool="avgmax", fc_norm=False), (64, 64), 4, True, unfused=True),
    # Hugging Face encoders
    "hf_vit_cls": ViTForm(
        lambda: hf.ViTForImageClassification(hf.ViTConfig(**VISION, num_labels=5)),
        (SIZE, SIZE),
        DEPTH,
        True,
        attn=HF_ATTN,
    ),
    "hf_vit_pooler": ViTForm(lambda: hf.ViTModel(hf.ViTConfig(**VISION)), (SIZE, SIZE), DEPTH, True, attn=HF_ATTN),
    "hf_clip_proj": ViTForm(
        lambda: hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(**VISION, projection_dim=16)),
        (SIZE, SIZE),
        DEPTH,
        True,
        attn=HF_ATTN,
    ),
    "hf_siglip": ViTForm(
        lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**VISION)), (SIZE, SIZE), DEPTH, False, attn=HF_ATTN
    ),
    "hf_dinov2": ViTForm(
        lambda: hf.Dinov2Model(hf.Dinov2Config(**DINO)), (SIZE, SIZE), DEPTH, True, {"input_size": SIZE}, attn=HF_ATTN
    ),
    "hf_dinov2_reg": ViTForm(
        lambda: hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(**DINO, num_register_tokens=2)),
        (SIZE, SIZE),
        DEPTH,
        True,
        {"input_size": SIZE},
        attn=HF_ATTN,
    ),
}


def build(name: str, attn: str = "sdpa") -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """A fresh eval-mode model (the same weights for a given form), a batch of 2 images and its apply() options."""
    form = FORMS[name]
    torch.manual_seed(0)
    model = form.factory().eval()
    if form.hf:
        model.set_attn_implementation(attn)
    if form.unfused:
        for block in model.blocks:
            block.attn.fused_attn = False
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    images = torch.randn(2, 3, *form.size, generator=torch.Generator().manual_seed(1))
    return model, images, dict(form.options)


def outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor output: a timm model's logits; a Hugging Face model's logits / image_embeds / pooler / tokens."""
    out = model(images)
    if isinstance(out, torch.Tensor):
        return [out]
    names = ("logits", "image_embeds", "pooler_output", "last_hidden_state")
    return [getattr(out, n) for n in names if getattr(out, n, None) is not None]

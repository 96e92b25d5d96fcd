"""Adapter for timm ``VisionTransformer`` (DeiT, ViT, DINOv2, register-token, no-class-token, ...).

The original blocks are wrapped, never copied: a wrapper holds its block as ``base_layer`` and, on layers
that reduce, runs the block's own submodules around the reduction (attention residual, reduce, MLP
residual), so LayerScale, drop-path, qk-norm and fused SDPA are whatever the block has. Keys/queries come
from forward hooks on ``attn.q_norm``/``attn.k_norm`` (identities when qk-norm is off), so attention
stays fused. Proportional attention is an additive float ``attn_mask`` of ``log(size)``. The wrapper flow
is shared with the Hugging Face adapters (:mod:`tokenprune.adapters.vit.reducing`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import Adapter, linear_macs
from tokenprune.adapters.capture import QKCapture
from tokenprune.adapters.vit.reducing import (
    PreNormParts,
    ReducingLayer,
    prenorm_layer_flops,
    prenorm_layer_macs,
    restore_layers,
    swap_layers,
)
from tokenprune.registry import register_adapter

# Submodules of a timm pre-norm block, for the in-layer (attention | reduce | MLP) split.
_PARTS = PreNormParts("norm1", "attn", "norm2", "mlp", "ls1", "drop_path1", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")


def _is_timm_vit(model: Any) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformer)


class ReducingBlock(ReducingLayer):
    """Wraps one timm block; removes ``runtime.schedule[layer]`` tokens between attention and MLP."""

    def __init__(self, base_layer: nn.Module, layer: int, runtime: Any) -> None:
        attn = base_layer.attn
        # q_norm/k_norm (identities without qk-norm) already emit (B, H, N, D).
        capture = QKCapture(attn.q_norm, attn.k_norm)
        super().__init__(base_layer, layer, runtime, _PARTS, capture, attn.scale)

    def call_base(self, x: torch.Tensor, bias: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.base_layer(x, attn_mask=bias)

    def attend(self, attn: nn.Module, h: torch.Tensor, bias: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        return attn(h, attn_mask=bias)

    def check_call(self, args: tuple, kwargs: dict) -> None:
        attn_mask = args[0] if args else kwargs.get("attn_mask")
        is_causal = args[1] if len(args) > 1 else kwargs.get("is_causal", False)
        if attn_mask is not None or is_causal:
            raise NotImplementedError(
                "tokenprune cannot reduce tokens under a caller-supplied attn_mask/is_causal; "
                "run inside tokenprune.disabled(model) for that call"
            )


class TimmViTAdapter(Adapter):
    """timm ``VisionTransformer`` with class/register/no prefix tokens and token/avg/avgmax/max/map pools."""

    description = "timm.models.vision_transformer.VisionTransformer"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        blocks = model.blocks
        for index, block in enumerate(blocks):
            missing = _PARTS.missing(block)
            missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(block, "attn", None), p)]
            if missing:
                raise TypeError(
                    f"block {index} ({type(block).__name__}) is not a supported timm block: missing {missing}; "
                    "supported: timm.models.vision_transformer.Block with timm.layers.Attention"
                )
        self.depth = len(blocks)
        self.num_protected = model.num_prefix_tokens
        self.has_class_token = model.cls_token is not None
        patch_embed = model.patch_embed
        self.has_static_size = not (
            getattr(model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_size", False)
        )
        attn = blocks[0].attn
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self._originals: list[nn.Module] = []
        self._layer_macs = [prenorm_layer_macs(b.attn, b.attn.num_heads * b.attn.head_dim, b.mlp) for b in blocks]

    # ----------------------------------------------------------------- token counts and FLOPs
    def grid_size(self, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for an input of ``input_size``."""
        patch_embed = self.model.patch_embed
        if input_size is None:
            if not self.has_static_size:
                raise ValueError(
                    "this model has dynamic_img_size=True, so its token count depends on the input: "
                    "pass input_size=(H, W) (e.g. input_size=224)"
                )
            input_size = patch_embed.img_size
        height, width = input_size
        if hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        patch_h, patch_w = patch_embed.patch_size
        return height // patch_h, width // patch_w

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        grid_h, grid_w = self.grid_size(input_size)
        return self.num_protected + grid_h * grid_w

    def embed_flops(self, num_tokens: int) -> float:
        proj = self.model.patch_embed.proj
        patches = num_tokens - self.num_protected
        return 2.0 * patches * proj.weight.numel() if isinstance(proj, nn.Conv2d) else 0.0

    def layer_flops(self, layer: int, tokens_in: int, tokens_out: int) -> float:
        return prenorm_layer_flops(self._layer_macs[layer], tokens_in, tokens_out)

    def head_flops(self, num_tokens: int) -> float:
        model = self.model
        flops = 0.0
        pooled_tokens = num_tokens - (0 if model.pool_include_prefix else self.num_protected)
        if model.attn_pool is not None:
            pool = model.attn_pool
            latent = pool.latent_len
            kv_macs = linear_macs(pool.kv)
            flops += 2.0 * pooled_tokens * kv_macs + 2.0 * latent * (linear_macs(pool) - kv_macs)
            flops += 4.0 * latent * pooled_tokens * pool.num_heads * pool.head_dim
            head_tokens = 1
        else:
            head_tokens = 1 if model.global_pool else num_tokens
        return flops + 2.0 * head_tokens * linear_macs(model.head)

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        model = self.model
        self._originals = swap_layers(model.blocks, lambda block, index: ReducingBlock(block, index, runtime))
        original_pool = model.pool

        def pool(x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
            return self._size_weighted_pool(runtime, original_pool, x, pool_type)

        # An instance attribute shadows VisionTransformer.pool; uninstall deletes it again.
        model.__dict__["pool"] = pool

    def uninstall(self) -> None:
        model = self.model
        restore_layers(model.blocks, self._originals)
        model.__dict__.pop("pool", None)
        self._originals = []

    def _size_weighted_pool(self, runtime: Any, original_pool, x: torch.Tensor, pool_type: str | None):
        """Average/attention pooling that counts each merged token as the tokens it holds."""
        model = self.model
        state = runtime.state
        if not runtime.enabled or state is None or not state.reduced or state.num_tokens != x.shape[1]:
            return original_pool(x, pool_type)
        start = 0 if model.pool_include_prefix else self.num_protected
        tokens, size = x[:, start:], state.size[:, start:]  # (B, N', C), (B, N', 1)
        if model.attn_pool is not None:
            return model.attn_pool(tokens, attn_mask=size.log().transpose(1, 2).unsqueeze(1))
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return original_pool(x, pool_type)  # token / max / none do not depend on sizes
        average = (tokens * size).sum(dim=1) / size.sum(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (tokens.amax(dim=1) + average)
        return average


register_adapter(_is_timm_vit, TimmViTAdapter, TimmViTAdapter.description)

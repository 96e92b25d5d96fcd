"""Adapter for Hugging Face ``SiglipVisionModel`` (transformers 5.x).

SigLIP has no class token: every token can be reduced (so ``evit``, which scores by class-token attention,
is refused). Its ``SiglipMultiheadAttentionPoolingHead`` pools all tokens with one probe query through an
``nn.MultiheadAttention``; once tokens are merged the adapter adds ``log(size)`` as that attention's float
``attn_mask``, so the pool weighs each merged token as the patches it holds (proportional attention, the
same as timm's ``map`` pool here). ``post_layernorm`` is per token; ``last_hidden_state`` has fewer tokens
when reduced. ``SiglipModel``: apply to ``siglip_model.vision_model``. ``SiglipForImageClassification``
averages the tokens without sizes and is not supported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vit.hf_clip import CLIP_STYLE_SPEC
from tokenprune.adapters.vit.hf_encoder import HFEncoderAdapter
from tokenprune.registry import register_adapter


class HFSiglipVisionAdapter(HFEncoderAdapter):
    """``SiglipVisionModel`` with or without its attention-pool head."""

    description = "transformers SiglipVisionModel (SiglipModel: apply to siglip_model.vision_model)"
    spec = CLIP_STYLE_SPEC

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._head_hook = None

    def find_layers(self, encoder: nn.Module) -> nn.ModuleList:
        return encoder.encoder.layers

    def patch_projection(self) -> nn.Conv2d:
        return self.encoder.embeddings.patch_embedding

    def prefix_tokens(self, config: Any) -> int:
        return 0

    def _pool_attention(self) -> nn.MultiheadAttention | None:
        head = getattr(self.encoder, "head", None) if getattr(self.encoder, "use_head", False) else None
        return None if head is None else head.attention

    def head_flops(self, num_tokens: int) -> float:
        attention = self._pool_attention()
        if attention is None:
            return 0.0
        head, dim = self.encoder.head, attention.embed_dim
        # One probe query: q projection on 1 token, k/v projections on every token, QK^T and AV on 1 x N,
        # then the output projection and the MLP on 1 token.
        flops = 2.0 * dim * dim + 2.0 * num_tokens * 2 * dim * dim + 4.0 * num_tokens * dim
        return flops + 2.0 * linear_macs(attention.out_proj) + 2.0 * linear_macs(head.mlp)

    def install_head(self, runtime: Any) -> None:
        attention = self._pool_attention()
        if attention is None:
            return
        heads = attention.num_heads

        def size_weighted(module: nn.Module, args: tuple, kwargs: dict):
            state = runtime.state
            key = args[1] if len(args) > 1 else kwargs["key"]  # (B, N, C)
            if not runtime.enabled or state is None or not state.reduced or state.index.shape != key.shape[:2]:
                return None
            batch, tokens = key.shape[:2]
            bias = state.attn_bias().to(key.dtype)  # (B, 1, 1, N) = log(size)
            # SigLIP's head passes no mask of its own; nn.MultiheadAttention wants (B * H, L, N).
            mask = bias.expand(batch, heads, 1, tokens).reshape(batch * heads, 1, tokens)
            return args, {**kwargs, "attn_mask": mask}

        self._head_hook = attention.register_forward_pre_hook(size_weighted, with_kwargs=True)

    def uninstall_head(self) -> None:
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None


register_adapter(hf_classes("SiglipVisionModel"), HFSiglipVisionAdapter, HFSiglipVisionAdapter.description)

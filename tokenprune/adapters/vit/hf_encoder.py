"""Shared adapter for Hugging Face (transformers 5.x) pre-norm vision encoders: ViT, CLIP, SigLIP, DINOv2.

Each family file (``hf_vit.py``, ``hf_clip.py``, ``hf_siglip.py``, ``hf_dinov2.py``) only names where its
layers, patch projection and head are; the wrapping is :class:`HFReducingLayer`, the same in-layer flow as
the timm adapter (:mod:`tokenprune.adapters.vit.reducing`):

* HF's own layers stay (as ``base_layer``); layers that remove nothing call them unchanged, so a zero
  schedule is bit-exact.
* Queries/keys come from forward hooks on the attention's ``q_proj``/``k_proj`` outputs, split into heads
  ``(B, H, N, D)``. None of these families has a q/k norm, and all apply the softmax scale inside the
  attention function (not in the projection), so the hooked projections are the raw queries/keys.
* HF's attention function is kept: ``sdpa`` and ``eager`` both work (proportional attention is passed as
  their additive float ``attention_mask``, ``(B, 1, 1, N)``); any other implementation is refused with an
  error naming these two.

What changes for callers once tokens are removed:

* ``last_hidden_state`` has fewer tokens (``patch.state.index`` says which original positions they stand
  for, ``patch.state.size`` how many patches each holds). Class/register tokens are never removed, so
  poolers that read token 0 (ViT, CLIP, DINOv2, ``ViTForImageClassification``) keep working; SigLIP's
  attention-pool head is made size-weighted (see ``hf_siglip.py``).
* Per-layer ``hidden_states`` are refused (NotImplementedError) on layers that remove tokens: they would
  have different lengths, and a VLM such as LLaVA builds its image tokens from
  ``vision_tower(..., output_hidden_states=...).hidden_states[vision_feature_layer]``. A patched LLaVA
  vision tower therefore raises our error (NotImplementedError, naming LLaVA) at the first reducing layer
  instead of handing the LLM fewer image features than image placeholders; ``tokenprune.apply(llava, ...)``
  itself is the LLaVA adapter's business (or the unsupported-model error without one):
  ``tokenprune.apply(llava, "tome", r=...)`` runs ToMe in its tower through this adapter and hands LLaVA
  unmerged hidden states (:mod:`tokenprune.adapters.vlm.tower_merge`), the one case these layers accept
  ``output_hidden_states``. Inside ``tokenprune.disabled(model)`` (or with a zero schedule) everything is the
  original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokenprune.adapters.base import Adapter, check_attn_implementation
from tokenprune.adapters.capture import QKCapture, split_heads
from tokenprune.adapters.vit.reducing import (
    PreNormParts,
    ReducingLayer,
    prenorm_layer_flops,
    prenorm_layer_macs,
    restore_layers,
    swap_layers,
)


@dataclass(frozen=True)
class HFLayerSpec:
    """Where one HF encoder family keeps the pieces of a layer.

    Attributes:
        parts: The layer's submodule names (norms, attention, MLP, layer scales, dropouts).
        scale_attr: Attribute of the attention module holding the softmax scale.
        heads_attr: Attribute of the attention module holding the number of heads.
        q_proj: Attention submodule producing the queries ``(B, N, H * D)``.
        k_proj: Attention submodule producing the keys ``(B, N, H * D)``.
    """

    parts: PreNormParts
    scale_attr: str
    heads_attr: str
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"


def check_encoder_attention(config: Any, owner: str) -> None:
    """Raise unless ``config`` runs attention as ``sdpa`` or ``eager``."""
    check_attn_implementation(
        config, owner, "on Hugging Face encoders (they take the proportional-attention bias as an additive float mask)"
    )


def _hidden_states_requested(kwargs: dict) -> bool:
    """Whether this forward collects per-layer ``hidden_states`` (by kwarg or by config)."""
    value = kwargs.get("output_hidden_states")
    if value is not None and value is not False:  # True, or an index / list of indices (LLaVA passes -2)
        return True
    try:  # config.output_hidden_states reaches the layers only through HF's output collector
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers
        return False
    collected = _active_collector.get()
    return bool(collected is not None and "hidden_states" in collected)


class HFReducingLayer(ReducingLayer):
    """Wraps one HF encoder layer (called as ``layer(hidden_states, attention_mask, **kwargs)``).

    Args:
        base_layer: The original HF layer.
        layer: Index of the layer in the schedule.
        runtime: The patch's shared runtime.
        spec: Where the family keeps the layer's pieces.
    """

    def __init__(self, base_layer: nn.Module, layer: int, runtime: Any, spec: HFLayerSpec) -> None:
        attn = getattr(base_layer, spec.parts.attn)
        heads = getattr(attn, spec.heads_attr)
        capture = QKCapture(getattr(attn, spec.q_proj), getattr(attn, spec.k_proj), split_heads(heads, attn.head_dim))
        super().__init__(base_layer, layer, runtime, spec.parts, capture, getattr(attn, spec.scale_attr))

    @staticmethod
    def _without_mask(kwargs: dict) -> dict:
        return {key: value for key, value in kwargs.items() if key != "attention_mask"}

    def call_base(self, x: torch.Tensor, bias: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.base_layer(x, bias, **self._without_mask(kwargs))

    def attend(self, attn: nn.Module, h: torch.Tensor, bias: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        return attn(h, attention_mask=bias, **self._without_mask(kwargs))[0]  # (output, weights)

    def check_call(self, args: tuple, kwargs: dict) -> None:
        if self.layer == 0:  # the implementation may be switched after apply(): check every forward
            attn = getattr(self.base_layer, self.parts.attn)
            check_encoder_attention(attn.config, type(self.base_layer).__name__)
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise NotImplementedError(
                "tokenprune cannot reduce tokens under a caller-supplied attention_mask; "
                "run inside tokenprune.disabled(model) for that call"
            )

    def check_reduce(self, kwargs: dict) -> None:
        # Inside a VLM's tower merge (tokenprune.adapters.vlm.tower_merge) the hidden states are rebuilt unmerged.
        if _hidden_states_requested(kwargs) and not getattr(self.runtime, "unmerges_hidden_states", False):
            raise NotImplementedError(
                f"layer {self.layer} removes tokens, so per-layer hidden_states would have different lengths; "
                "output_hidden_states is not supported while tokens are reduced. If this encoder is the "
                "vision tower of a VLM (e.g. LLaVA, which takes hidden_states[vision_feature_layer] as image "
                "tokens), reducing the tower alone would hand the language model fewer image features than "
                "image placeholders: patch.remove() and apply the method to the VLM itself (e.g. "
                "tokenprune.apply(llava, 'tome', r=8) merges inside its tower and hands the LLM fewer tokens), "
                "or run that call inside tokenprune.disabled(model)."
            )


class HFEncoderAdapter(Adapter):
    """Base adapter for HF pre-norm ViT-style encoders; family subclasses fill in the hooks below.

    Subclasses set :attr:`spec` and :attr:`description` and implement :meth:`find_layers`,
    :meth:`patch_projection`, :meth:`prefix_tokens` and :meth:`head_flops`; they may override
    :meth:`find_encoder`, :meth:`install_head` and :meth:`uninstall_head`.

    Attributes:
        encoder: The module owning the config, embeddings and layers (``model`` itself or e.g. ``model.vit``).
        layers: The ``nn.ModuleList`` of encoder layers that gets wrapped.
    """

    spec: ClassVar[HFLayerSpec]
    has_static_size = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.encoder = self.find_encoder(model)
        config = self.encoder.config
        check_encoder_attention(config, type(model).__name__)
        self.layers = self.find_layers(self.encoder)
        parts = self.spec.parts
        for index, layer in enumerate(self.layers):
            attn = getattr(layer, parts.attn, None)
            missing = parts.missing(layer) + [
                f"{parts.attn}.{name}"
                for name in (self.spec.q_proj, self.spec.k_proj, self.spec.scale_attr, self.spec.heads_attr, "head_dim")
                if not hasattr(attn, name)
            ]
            if missing:
                raise TypeError(
                    f"layer {index} ({type(layer).__name__}) of {type(model).__name__} is not the layer layout "
                    f"tokenprune knows (transformers 5.x): missing {missing}"
                )
        self.depth = len(self.layers)
        self.num_protected = self.prefix_tokens(config)
        self.has_class_token = self.num_protected > 0
        attn = getattr(self.layers[0], parts.attn)
        self.num_heads = getattr(attn, self.spec.heads_attr)
        self.head_dim = attn.head_dim
        self._layer_macs = []
        for layer in self.layers:
            layer_attn = getattr(layer, parts.attn)
            attn_dim = getattr(layer_attn, self.spec.heads_attr) * layer_attn.head_dim
            self._layer_macs.append(prenorm_layer_macs(layer_attn, attn_dim, getattr(layer, parts.mlp)))
        self._originals: list[nn.Module] = []

    # ----------------------------------------------------------------- family hooks
    def find_encoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``config``, the embeddings and the layers (default: ``model``)."""
        return model

    def find_layers(self, encoder: nn.Module) -> nn.ModuleList:
        """The encoder's list of layers."""
        raise NotImplementedError

    def patch_projection(self) -> nn.Conv2d:
        """The patch-embedding convolution (its stride is the patch size)."""
        raise NotImplementedError

    def prefix_tokens(self, config: Any) -> int:
        """Leading class/register tokens, never reduced."""
        raise NotImplementedError

    def install_head(self, runtime: Any) -> None:
        """Make the head size-aware, if it pools over tokens (default: nothing to do)."""

    def uninstall_head(self) -> None:
        """Undo :meth:`install_head`."""

    # ----------------------------------------------------------------- token counts and FLOPs
    def grid_size(self, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for an input of ``input_size`` (the config's image size if None)."""
        if input_size is None:
            if not self.has_static_size:
                raise ValueError(
                    f"{type(self.model).__name__} accepts any image size (its position embeddings are "
                    "interpolated), so its token count depends on the input: pass input_size=(H, W) "
                    "(e.g. input_size=224)"
                )
            size = self.encoder.config.image_size
            input_size = (size, size) if isinstance(size, int) else tuple(size)
        patch_h, patch_w = self.patch_projection().stride
        return input_size[0] // patch_h, input_size[1] // patch_w

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        grid_h, grid_w = self.grid_size(input_size)
        return self.num_protected + grid_h * grid_w

    def embed_flops(self, num_tokens: int) -> float:
        return 2.0 * (num_tokens - self.num_protected) * self.patch_projection().weight.numel()

    def layer_flops(self, layer: int, tokens_in: int, tokens_out: int) -> float:
        return prenorm_layer_flops(self._layer_macs[layer], tokens_in, tokens_out)

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        self._originals = swap_layers(
            self.layers, lambda layer, index: HFReducingLayer(layer, index, runtime, self.spec)
        )
        self.install_head(runtime)

    def uninstall(self) -> None:
        restore_layers(self.layers, self._originals)
        self._originals = []
        self.uninstall_head()

"""The in-layer reduction every pre-norm ViT adapter shares: attention residual | reduce | MLP residual.

A :class:`ReducingLayer` wraps one original layer (kept as ``base_layer``) and never copies its forward:

* layers that remove nothing (and every layer under ``tokenprune.disabled``) call ``base_layer`` itself;
* a layer that removes tokens runs the base layer's own submodules, named by :class:`PreNormParts`, around
  the reduction: ``x + drop1(scale1(attn(norm1(x))))``, reduce, ``x + drop2(scale2(mlp(norm2(x))))``.

Queries/keys come from forward hooks (:class:`QKCapture`) on the attention's q/k outputs, so the model's
fused attention (SDPA) keeps running. Proportional attention is passed as an additive float mask of
``log(size)``. Family adapters (timm, Hugging Face) subclass :class:`ReducingLayer` and say only how to call
their layer and attention and what inputs they refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import linear_macs
from tokenprune.adapters.capture import QKCapture
from tokenprune.methods.base import LayerContext
from tokenprune.state import LayerLog


@dataclass(frozen=True)
class PreNormParts:
    """Attribute names of a pre-norm layer's submodules; None stands for the identity.

    Attributes:
        norm1: Norm before attention.
        attn: Attention module.
        norm2: Norm before the MLP.
        mlp: MLP module.
        scale1: LayerScale on the attention output.
        drop1: Dropout/drop-path on the attention branch.
        scale2: LayerScale on the MLP output.
        drop2: Dropout/drop-path on the MLP branch.
    """

    norm1: str
    attn: str
    norm2: str
    mlp: str
    scale1: str | None = None
    drop1: str | None = None
    scale2: str | None = None
    drop2: str | None = None

    def missing(self, layer: nn.Module) -> list[str]:
        """Names this spec needs that ``layer`` lacks."""
        names = [self.norm1, self.attn, self.norm2, self.mlp, self.scale1, self.drop1, self.scale2, self.drop2]
        return [name for name in names if name is not None and not hasattr(layer, name)]


def _maybe(layer: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    return x if name is None else getattr(layer, name)(x)


class ReducingLayer(nn.Module):
    """Wraps one pre-norm layer; removes ``runtime.schedule[layer]`` tokens between attention and MLP.

    Subclasses implement :meth:`call_base` and :meth:`attend`, and may refuse inputs in :meth:`check_call`
    (every enabled call) and :meth:`check_reduce` (calls that remove tokens).

    Args:
        base_layer: The original layer, kept as a submodule and restored by the adapter's uninstall.
        layer: Index of the layer in the schedule.
        runtime: The patch's shared :class:`tokenprune.runtime.Runtime`.
        parts: Names of ``base_layer``'s submodules.
        capture: Hooks that capture this layer's queries and keys.
        scale: Softmax scale of the attention.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layer: int,
        runtime: Any,
        parts: PreNormParts,
        capture: QKCapture,
        scale: float,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        # Plain attributes (not submodules): the runtime is shared by all wrappers of one patch.
        self.__dict__["runtime"] = runtime
        self.parts = parts
        self.capture = capture
        self.scale = scale

    # ----------------------------------------------------------------- family-specific pieces
    def call_base(self, x: torch.Tensor, bias: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run ``base_layer`` on ``x`` ``(B, N, C)`` with ``bias`` as its attention mask."""
        raise NotImplementedError

    def attend(self, attn: nn.Module, h: torch.Tensor, bias: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """Run the attention module on normed ``h`` ``(B, N, C)``; returns its output ``(B, N, C)``."""
        raise NotImplementedError

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Raise for inputs the reduced path cannot honour (e.g. a caller-supplied mask)."""

    def check_reduce(self, kwargs: dict) -> None:
        """Raise for requests that are wrong once this layer removes tokens."""

    # ----------------------------------------------------------------- the shared flow
    def remove_hooks(self) -> None:
        """Remove the capture hooks (the adapter calls this on uninstall)."""
        self.capture.remove()

    def attention_residual(self, x: torch.Tensor, bias: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        """``x + drop1(scale1(attn(norm1(x))))`` with the base layer's own modules; ``(B, N, C)``."""
        block, parts = self.base_layer, self.parts
        out = self.attend(getattr(block, parts.attn), getattr(block, parts.norm1)(x), bias, kwargs)
        return x + _maybe(block, parts.drop1, _maybe(block, parts.scale1, out))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + drop2(scale2(mlp(norm2(x))))`` with the base layer's own modules; ``(B, N', C)``."""
        block, parts = self.base_layer, self.parts
        out = getattr(block, parts.mlp)(getattr(block, parts.norm2)(x))
        return x + _maybe(block, parts.drop2, _maybe(block, parts.scale2, out))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        runtime = self.runtime
        if not runtime.enabled:
            return self.base_layer(x, *args, **kwargs)
        self.check_call(args, kwargs)
        state = runtime.begin(x) if self.layer == 0 else runtime.state
        removed = runtime.schedule[self.layer]
        tokens_in = x.shape[1]
        bias = state.attn_bias() if runtime.method.prop_attn else None  # (B, 1, 1, N) or None
        if removed == 0:
            x = self.call_base(x, bias, args, kwargs)
        else:
            self.check_reduce(kwargs)
            self.capture.active = True
            try:
                x = self.attention_residual(x, bias, kwargs)  # (B, N, C)
            finally:
                self.capture.active = False
            queries, keys = self.capture.pop()
            ctx = LayerContext(self.layer, queries, keys, self.scale, bias)
            x = runtime.method.reduce(x, state, removed, ctx)  # (B, N - removed, C)
            x = self.mlp_residual(x)
        state.log.append(LayerLog(self.layer, tokens_in, x.shape[1]))
        return x


def prenorm_layer_macs(attn: nn.Module, attn_dim: int, mlp: nn.Module) -> tuple[int, int, int]:
    """Per-token MACs of one layer's attention linears, its attention width and its MLP linears."""
    return linear_macs(attn), attn_dim, linear_macs(mlp)


def prenorm_layer_flops(macs: tuple[int, int, int], tokens_in: int, tokens_out: int) -> float:
    """FLOPs (2 x MAC) of a layer whose attention sees ``tokens_in`` and whose MLP sees ``tokens_out``."""
    attn_linear, attn_dim, mlp_linear = macs
    # QK^T and AV: 2 * N^2 * attn_dim FLOPs each.
    return 2.0 * tokens_in * attn_linear + 4.0 * tokens_in**2 * attn_dim + 2.0 * tokens_out * mlp_linear


def swap_layers(layers: nn.ModuleList, wrap: Callable[[nn.Module, int], nn.Module]) -> list[nn.Module]:
    """Replace every entry of ``layers`` by ``wrap(original, index)``; returns the originals."""
    originals = list(layers)
    for index, original in enumerate(originals):
        layers[index] = wrap(original, index)
    return originals


def restore_layers(layers: nn.ModuleList, originals: list[nn.Module]) -> None:
    """Undo :func:`swap_layers`: remove the wrappers' hooks and put the exact original modules back."""
    for index, original in enumerate(originals):
        wrapper = layers[index]
        if isinstance(wrapper, ReducingLayer):
            wrapper.remove_hooks()
        layers[index] = original

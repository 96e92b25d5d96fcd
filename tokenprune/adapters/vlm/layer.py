"""The decoder-layer wrapper: the original layer always runs; its queries and keys are captured when it prunes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenprune.adapters.capture import QKCapture
from tokenprune.adapters.vlm.decode_selection import run_decode_layer

if TYPE_CHECKING:
    from tokenprune.adapters.vlm.reducer import DecoderReducer


@dataclass(frozen=True)
class DecoderSpec:
    """Names inside a decoder layer (Llama/Qwen2/Mistral layout by default).

    Attributes:
        attn: The self-attention submodule (it has ``head_dim`` and ``scaling``).
        q_proj: Query projection inside ``attn``.
        k_proj: Key projection inside ``attn``.
        mlp: The MLP submodule.
        q_norm: Per-head query norm inside ``attn`` applied before the rotary embedding (Qwen3, Gemma 3); the
            queries are read after it where the layer has one.
        k_norm: Per-head key norm likewise.
    """

    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    mlp: str = "mlp"
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"

    def missing(self, layer: nn.Module) -> list[str]:
        """Names this layout needs that ``layer`` lacks (empty: the layout fits)."""
        attn = getattr(layer, self.attn, None)
        missing = [n for n in (self.attn, self.mlp) if not hasattr(layer, n)]
        needed = (self.q_proj, self.k_proj, "head_dim", "scaling")
        return missing + [f"{self.attn}.{n}" for n in needed if not hasattr(attn, n)]

    def query_key_modules(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs are the queries and keys as the rotary embedding receives them."""
        attn = getattr(layer, self.attn)
        q, k = getattr(attn, self.q_norm, None), getattr(attn, self.k_norm, None)
        return (getattr(attn, self.q_proj) if q is None else q), (getattr(attn, self.k_proj) if k is None else k)


def to_heads(head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(B, N, H * D)`` (a projection) or ``(B, N, H, D)`` (a per-head norm) -> ``(B, H, N, D)``."""

    def split(x: torch.Tensor) -> torch.Tensor:
        return (x.unflatten(-1, (-1, head_dim)) if x.ndim == 3 else x).transpose(1, 2)

    return split


class ReducingDecoderLayer(nn.Module):
    """Wraps one decoder layer; after it runs, removes the visual tokens the plan drops at the next layer."""

    def __init__(self, base_layer: nn.Module, layer: int, reducer: DecoderReducer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.__dict__["reducer"] = reducer  # plain attribute: shared, not a submodule
        self.capture: QKCapture | None = None  # None: a layer without softmax attention (a linear-attention layer)
        if hasattr(base_layer, reducer.spec.attn):
            q_module, k_module = reducer.spec.query_key_modules(base_layer)
            self.capture = QKCapture(q_module, k_module, to_heads(reducer.head_dim))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        fwd = self.reducer.forward_in_flight
        if fwd is None:
            return self.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        if fwd.decode:
            session = fwd.session
            if session.compact[self.layer]:
                layer = self.layer
                attention_mask = self.reducer.mask(session.key_valid[layer], session.key_length[layer], hidden_states)
            if session.decode_kv is not None and self.reducer.runtime.enabled:
                return run_decode_layer(self, hidden_states, attention_mask, kwargs, session)
            return self.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        return self.reducer.run_prefill_layer(self, hidden_states, attention_mask, kwargs)

    def remove_hooks(self) -> None:
        if self.capture is not None:
            self.capture.remove()

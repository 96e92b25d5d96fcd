"""What a method is, and the per-layer context an adapter hands it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tokenprune.config import ReductionConfig
from tokenprune.state import TokenState


@dataclass
class LayerContext:
    """What one layer's attention exposed for the method to score tokens with.

    Attributes:
        layer: Layer index.
        queries: ``(B, H, N, D)`` attention queries after any q-norm (None if the method needs none).
        keys: ``(B, H, N, D)`` attention keys after any k-norm.
        scale: Softmax scale of the attention (usually ``D ** -0.5``).
        attn_bias: Additive bias the attention used (proportional attention), ``(B, 1, 1, N)`` or None.
    """

    layer: int
    queries: torch.Tensor | None
    keys: torch.Tensor | None
    scale: float
    attn_bias: torch.Tensor | None = None

    def key_metric(self) -> torch.Tensor:
        """ToMe's similarity features: keys averaged over heads, ``(B, N, D)``."""
        return self.keys.mean(dim=1)

    def class_attention(self) -> torch.Tensor:
        """Attention of the first (class) token to every token, averaged over heads: ``(B, N)``.

        One query row per head against all keys (``(B, H, 1, D) @ (B, H, D, N)``): a small extra product,
        so the layer's own attention can stay fused and never materialise the full ``N x N`` map.
        """
        logits = (self.queries[:, :, :1] * self.scale) @ self.keys.transpose(-1, -2)  # (B, H, 1, N)
        if self.attn_bias is not None:
            logits = logits + self.attn_bias
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


class Method:
    """Base class: decides which tokens go. Adapters decide where and how the sequence is fed onward.

    Subclasses set ``name`` and ``needs`` and implement :meth:`max_removable` and :meth:`reduce`.
    """

    name: ClassVar[str] = ""
    #: Model kinds the method reduces: a subset of ``{"vit", "vlm", "dense"}`` (``tokenprune.methods(kind=...)``).
    kinds: ClassVar[frozenset[str]] = frozenset()
    #: Config options under which the method reduces nothing: the patched model equals the unpatched one.
    identity: ClassVar[Mapping[str, Any]] = {}
    #: Options of a typical reducing call on a small model (a few layers, tens of tokens): docs and test matrices.
    example: ClassVar[Mapping[str, Any]] = {}
    #: False when which tokens a sample keeps depends on the batch around it (random draws): a batch then keeps as
    #: many tokens per sample as each sample alone, not the same ones.
    batch_invariant: ClassVar[bool] = True
    #: True for the control row of every sweep (``none``): it reduces nothing whatever its options.
    control: ClassVar[bool] = False
    #: Which captured tensors :meth:`reduce` uses: a subset of {"queries", "keys"}.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: True when the method scores tokens by class-token attention.
    needs_class_token: ClassVar[bool] = False
    #: True when attention should get ``log(size)`` (proportional attention) once tokens are merged.
    prop_attn: bool = False

    def __init__(self, config: ReductionConfig) -> None:
        self.config = config
        self.prop_attn = bool(getattr(config, "prop_attn", False))

    def check_model(self, adapter: Any) -> None:
        """Raise if the config cannot work on the model ``adapter`` wraps (called by ``tokenprune.apply``)."""

    def max_removable(self, reducible: int) -> int:
        """Most tokens one layer may remove when ``reducible`` non-protected tokens remain."""
        raise NotImplementedError

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        """Remove ``r`` tokens from ``x`` ``(B, N, C)``, updating ``state``; returns ``(B, N - r, C)``."""
        raise NotImplementedError

    def overhead_flops(self, num_tokens: int, num_protected: int, r: int, num_heads: int, head_dim: int) -> float:
        """Matmul FLOPs (2 x MAC) the method adds per image at a layer with ``num_tokens`` and ``r``."""
        return 0.0


class SeededRandom:
    """Uniform random scores from one generator per device, seeded once, so a patch's draws are reproducible.

    Args:
        seed: Seed of every device's generator; None draws from torch's global generator (nondeterministic).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def rand(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``torch.rand(shape)`` on ``device`` from this object's generator for that device."""
        generator = None
        if self.seed is not None:
            if device not in self._generators:
                self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
            generator = self._generators[device]
        return torch.rand(shape, device=device, generator=generator)

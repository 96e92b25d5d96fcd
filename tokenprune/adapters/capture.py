"""Forward hooks that keep an attention's queries and keys (ViT blocks, decoder layers, vision towers alike)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class QKCapture:
    """Forward hooks that keep one layer's attention queries and keys, only while :attr:`active`.

    Args:
        q_module: Module whose output is the queries (a q projection, or a q-norm after it).
        k_module: Module whose output is the keys.
        to_heads: Maps a hooked output to ``(B, H, N, D)``; None if it already has that shape.
    """

    def __init__(
        self,
        q_module: nn.Module,
        k_module: nn.Module,
        to_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.active = False
        self.captured: dict[str, torch.Tensor] = {}
        self._to_heads = to_heads
        self._handles = [
            q_module.register_forward_hook(self._hook("queries")),
            k_module.register_forward_hook(self._hook("keys")),
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.active:
                # A view of the model's own tensor: nothing is copied.
                self.captured[name] = output if self._to_heads is None else self._to_heads(output)

        return hook

    def pop(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The captured ``(queries, keys)``, each ``(B, H, N, D)`` or None; clears the capture."""
        captured, self.captured = self.captured, {}
        return captured.get("queries"), captured.get("keys")

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def split_heads(num_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(B, N, H * D) -> (B, H, N, D)`` for projections that emit all heads side by side."""

    def to_heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)

    return to_heads

"""Vision-tower signals for pre-LLM methods: one tower layer's queries and keys, captured by hooks, never from
``output_attentions`` (the tower's attention stays fused), turned into per-patch attention and keys.

A capture stays armed while its patch is installed and keeps every run of the tower since it was last read:
``generate()`` encodes images (and, for Qwen2-VL, videos in a second run) before its first forward, a plain forward
inside it; the family adapter reads the runs at the LLM's entry and maps patches onto LLM tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.capture import QKCapture, split_heads
from tokenprune.adapters.vlm.flops import tower_layers


class ViTTowerCapture:
    """Queries and keys ``(I, H, P, D)`` of one layer of a ViT-layout tower (CLIP, SigLIP, Idefics3), per run."""

    def __init__(self, tower: nn.Module, layer: int) -> None:
        attn = tower_layers(tower)[layer].self_attn
        heads = tower.config.num_attention_heads
        self._capture = QKCapture(attn.q_proj, attn.k_proj, split_heads(heads, attn.head_dim))
        self._capture.active = True
        self.runs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = attn.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: object) -> None:
        queries, keys = self._capture.pop()
        if queries is not None and keys is not None:
            self.runs.append((queries, keys))

    def pop(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every run since the last read, in order; clears them."""
        runs, self.runs = self.runs, []
        return runs

    def remove(self) -> None:
        self._capture.remove()
        self._handle.remove()
        self.runs = []


def patch_attention(queries: torch.Tensor, keys: torch.Tensor, class_token: bool, chunk: int = 256) -> torch.Tensor:
    """``(I, P)`` per patch: the class token's attention to it, or (no class token) the mean attention it receives.

    From a tower layer's queries and keys ``(I, H, P, D)``, in float32, averaged over heads. The class-token row
    is one ``(1 x D) @ (D x P)`` product per head; the mean over all queries runs ``chunk`` query rows at a time,
    so memory stays ``(I, H, chunk, P)``.
    """
    q, k = queries.float(), keys.float().transpose(-1, -2)  # (I, H, P, D), (I, H, D, P)
    scale = q.shape[-1] ** -0.5
    if class_token:
        return ((q[:, :, :1] @ k) * scale).softmax(dim=-1).mean(dim=1)[:, 0]  # (I, P)
    received = torch.zeros(q.shape[0], q.shape[2], device=q.device)
    for start in range(0, q.shape[2], chunk):
        received += ((q[:, :, start : start + chunk] @ k) * scale).softmax(dim=-1).sum(dim=(1, 2))
    return received / (q.shape[1] * q.shape[2])


def scatter_tokens(values: torch.Tensor, placeholders: torch.Tensor) -> torch.Tensor:
    """``(B, L, ...)``: ``values`` ``(n, ...)`` written onto the ``True`` entries of ``placeholders`` ``(B, L)``.

    In row-major order, as HF's ``masked_scatter`` writes image features; 0 elsewhere.
    """
    out = torch.zeros(*placeholders.shape, *values.shape[1:], dtype=values.dtype, device=placeholders.device)
    out[placeholders] = values.to(placeholders.device)
    return out

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
    """Queries and keys ``(I, H, P, D)`` of one layer of a ViT-layout tower, per run.

    CLIP, SigLIP and Idefics3 towers name them ``self_attn.q_proj`` / ``k_proj``; DINOv2 ``attention.q_proj`` /
    ``k_proj``.
    """

    def __init__(self, tower: nn.Module, layer: int) -> None:
        block = tower_layers(tower)[layer]
        heads = tower.config.num_attention_heads
        head_dim = tower.config.hidden_size // heads
        attn = block.self_attn if hasattr(block, "self_attn") else block.attention  # CLIP/SigLIP, DINOv2
        self._capture = QKCapture(attn.q_proj, attn.k_proj, split_heads(heads, head_dim))
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


def attention_flops(tokens: int, heads: int, head_dim: int, class_token: bool) -> float:
    """Matmul FLOPs (2 x MAC) :func:`patch_attention` spends on one image (or segment) of ``tokens`` patches."""
    rows = 1 if class_token else tokens
    return 2.0 * rows * tokens * heads * head_dim


def expand_rows(values: torch.Tensor, placeholders: torch.Tensor) -> torch.Tensor | None:
    """``values`` (one row per placeholder of each *encoded* sample) matched to ``placeholders`` ``(B, L)``.

    ``generate()`` with beams (or ``num_return_sequences``) encodes each prompt's images once and repeats that
    sample's features for its ``r`` consecutive copies ([A, B] -> [A, B, A, B]); the signals are repeated the same
    way. None when the counts cannot be matched.
    """
    rows, total = values.shape[0], int(placeholders.sum())
    if rows == total:
        return values
    if rows == 0 or total % rows or placeholders.shape[0] % (total // rows):
        return None
    repeat = total // rows
    counts = placeholders.sum(dim=1).tolist()[::repeat]  # (B / r,) each encoded sample's placeholders
    if sum(counts) != rows:
        return None
    return torch.cat([chunk for chunk in values.split(counts) for _ in range(repeat)])


def per_sample_flops(owner: torch.Tensor, placeholders: torch.Tensor, costs: torch.Tensor) -> list[float]:
    """FLOPs per sample: ``costs[i]`` for every image ``i`` among a sample's placeholders.

    ``owner`` ``(n,)`` is the image of each placeholder row (``-1``: none), ``placeholders`` ``(B, L)``.
    """
    owners = torch.full(placeholders.shape, -1, dtype=torch.long, device=placeholders.device)
    owners[placeholders] = owner.to(placeholders.device)
    return [float(costs[torch.unique(row[row >= 0]).cpu()].sum()) for row in owners]

"""Test helpers that watch a pre-LLM method: what its ``merge`` sees and returns, and the tower's eager attention."""

from __future__ import annotations

import pytest
import torch


def record_merges(monkeypatch: pytest.MonkeyPatch, method_cls: type) -> list[tuple]:
    """Every ``(context, reduction)`` pair ``method_cls.merge`` sees and returns from now on (the test's patch)."""
    seen: list[tuple] = []
    merge = method_cls.merge

    def recording(self, ctx):
        out = merge(self, ctx)
        seen.append((ctx, out))
        return out

    monkeypatch.setattr(method_cls, "merge", recording)
    return seen


def eager_attention(tower: torch.nn.Module, call: tuple, layer: int) -> torch.Tensor:
    """``(I, H, P, P)`` the tower layer's attention map, rerun on its recorded ``(args, kwargs)`` call with eager
    attention and ``output_attentions`` (what the methods' reference codes read; tokenprune never does)."""
    args, kwargs = call
    tower.set_attn_implementation("eager")
    try:
        return tower(*args, **{**kwargs, "output_attentions": True}).attentions[layer].float()
    finally:
        tower.set_attn_implementation("sdpa")

"""Test helpers that watch a pre-LLM method: what its ``merge`` sees and returns, and the tower's eager attention."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune.adapters.vlm.flops import tower_layers


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


def patched_run_and_eager_attention(model, tower, inputs: dict, method: str, options: dict) -> tuple:
    """Apply ``method`` and run ``inputs``; ``(patch, layer, attention)``: the patch (still applied), the
    penultimate tower layer and its ``(I, H, P, P)`` eager attention map on the tower call that forward made."""
    calls = []
    handle = tower.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    with torch.no_grad():
        patch = tokenprune.apply(model, method, **options)
        model(**inputs)
        handle.remove()
        layer = len(tower_layers(tower)) - 2
        return patch, layer, eager_attention(tower, calls[0], layer)


def eager_token_scores(family: str, model: torch.nn.Module, inputs: dict, method: str, options: dict) -> torch.Tensor:
    """``(I, n)`` per LLM token, the penultimate tower layer's scores from HF's own eager attention, for the tower
    call a patched forward makes: LLaVA (CLIP) the class token's row without its own column; Idefics3 (no class
    token) the mean attention each patch receives, averaged over the pixel shuffle's 2 x 2 blocks."""
    tower = model.model.vision_tower if family.startswith("llava") else model.model.vision_model
    patch, _, attention = patched_run_and_eager_attention(model, tower, inputs, method, options)  # (I, H, P, P)
    patch.remove()
    if family.startswith("llava"):
        return attention[:, :, 0].mean(dim=1)[:, 1:]  # (I, n): LLaVA drops the class token's own feature
    grid = attention.mean(dim=(1, 2)).view(-1, 8, 8)  # (I, 8, 8) patches, then the shuffle's 2 x 2 blocks
    return grid.view(-1, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)  # (I, 16)

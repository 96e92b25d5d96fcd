"""PiToMe against a naive per-sample float64 reference (energy, mergeable set, A/B split, best match, merge).

The shared exactness properties (zero reduction bit-exact, remove(), sizes/sources, batch vs one-by-one, FLOPs)
run in ``tests/test_vit_matrix.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenprune
from tokenprune.core.merge import reduce_tokens
from tokenprune.methods.pitome import pitome_plan
from tokenprune.state import TokenState


def naive_plan(metric: torch.Tensor, r: int, prefix: int, margin: float, alpha: float) -> dict[int, int]:
    """One sample ``(N, D)``: ``{src position: dst position}`` by PiToMe's definition, in float64 loops."""
    tokens = [metric[i].double() / metric[i].double().norm() for i in range(prefix, metric.shape[0])]
    m = len(tokens)

    def elu(v: float) -> float:
        return v if v > 0 else alpha * (math.exp(v) - 1)

    sim = [[float(tokens[i] @ tokens[j]) for j in range(m)] for i in range(m)]
    energy = [sum(elu(sim[i][j] - margin) for j in range(m)) / m for i in range(m)]
    order = sorted(range(m), key=lambda i: -energy[i])[: 2 * r]
    set_a, set_b = order[::2], order[1::2]
    return {prefix + a: prefix + max(set_b, key=lambda b: sim[a][b]) for a in set_a}


@pytest.mark.parametrize("prefix,r,margin", [(1, 5, 0.5), (0, 8, 0.1), (5, 1, 0.9), (1, 12, -0.2)])
def test_plan_matches_naive_reference(prefix, r, margin):
    torch.manual_seed(0)
    metric = torch.randn(3, 25 + prefix, 16)
    src, dst, kept = pitome_plan(metric, r, prefix, margin, alpha=1.0)
    for b in range(3):
        assert dict(zip(src[b].tolist(), dst[b].tolist(), strict=True)) == naive_plan(metric[b], r, prefix, margin, 1.0)
        assert kept[b].tolist() == sorted(set(range(metric.shape[1])) - set(src[b].tolist()))


def test_low_energy_tokens_are_protected():
    """Tokens like no other (low energy) are never merged; a block of near-duplicates merges first."""
    torch.manual_seed(1)
    base = torch.randn(1, 16)
    duplicates = base + 0.01 * torch.randn(8, 16)  # 8 near-identical tokens: high energy
    distinct = torch.linalg.qr(torch.randn(16, 16))[0][:8]  # 8 orthonormal tokens: low energy
    metric = torch.cat([distinct, duplicates]).unsqueeze(0)  # (1, 16, 16), no prefix
    src, dst, _ = pitome_plan(metric, 4, 0, margin=0.5)
    assert set(src[0].tolist()) | set(dst[0].tolist()) <= set(range(8, 16))


def test_reduce_is_the_size_weighted_average_of_each_group():
    torch.manual_seed(2)
    x = torch.randn(2, 21, 8)
    state = TokenState.start(x, 1)
    src, dst, kept = pitome_plan(torch.randn(2, 21, 4), 6, 1, 0.3)
    out = reduce_tokens(x, state, kept, src, dst)
    for b in range(2):
        groups = {int(k): [int(k)] for k in kept[b]}
        for s, d in zip(src[b].tolist(), dst[b].tolist(), strict=True):
            groups[d].append(s)
        expected = torch.stack([x[b, groups[int(k)]].double().mean(0) for k in kept[b]])
        torch.testing.assert_close(out[b].double(), expected)
        assert state.size[b, :, 0].tolist() == [float(len(groups[int(k)])) for k in kept[b]]


def test_margin_schedule_and_options():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2).eval()
    patch = tokenprune.apply(model, "pitome", r=2)
    method = patch.runtime.method
    assert [method.margin(layer) for layer in range(4)] == pytest.approx([0.9, 0.7, 0.5, 0.3])
    patch.remove()
    patch = tokenprune.apply(model, "pitome", r=2, margin=0.25)
    assert patch.runtime.method.margin(3) == 0.25
    patch.remove()
    with pytest.raises(ValueError, match="margin"):
        tokenprune.apply(model, "pitome", r=2, margin=2.0)
    with pytest.raises(ValueError, match="alpha"):
        tokenprune.apply(model, "pitome", r=2, alpha=0.0)
    with pytest.raises(ValueError, match="out of range"):
        pitome_plan(torch.randn(1, 9, 4), 5, 1, 0.5)


def test_patched_layer_merges_by_the_plan_of_its_keys():
    """A patched one-merge model equals running the blocks by hand with pitome_plan on the captured keys."""
    torch.manual_seed(3)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    keys = {}
    block = model.blocks[0]
    hook = block.attn.k_norm.register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        x = x + block.ls1(block.attn(block.norm1(x)))
        hook.remove()
        state = TokenState.start(x, 1)
        src, dst, kept = pitome_plan(keys["k"].mean(1), 4, 1, 0.9)
        x = reduce_tokens(x, state, kept, src, dst)
        x = x + block.ls2(block.mlp(block.norm2(x)))
        x = model.blocks[1](x, attn_mask=state.attn_bias())
        expected = model.forward_head(model.norm(x))
        patch = tokenprune.apply(model, "pitome", r=[4, 0])
        got = model(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert patch.state.num_tokens == 17 - 4

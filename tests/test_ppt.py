"""PPT against a naive per-sample float64 reference: the prune-or-pool choice, the pruned set, ToMe pooling.

The shared exactness properties run in ``tests/test_vit_matrix.py`` (there each random-weight form takes one
branch or the other); here one batch mixes images that prune with images that pool.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune.methods.base import LayerContext
from tokenprune.methods.ppt import PPT, PPTConfig, importance_variance
from tokenprune.state import TokenState

B, H, N, D, C, PREFIX = 6, 2, 19, 8, 12, 1


def naive_class_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> list[float]:
    """One sample ``(H, N, D)``: the class row of softmax(q k^T * scale), averaged over heads."""
    rows = [torch.softmax((q[h, 0].double() @ k[h].double().T) * scale, dim=0) for h in range(q.shape[0])]
    return (sum(rows) / len(rows)).tolist()


def naive_variance(attention: list[float], prefix: int) -> float:
    scores = attention[prefix:]
    m = len(scores)
    scaled = [s * m / sum(scores) for s in scores]
    mean = sum(scaled) / m
    return sum((v - mean) ** 2 for v in scaled) / (m - 1)


def naive_prune(x: torch.Tensor, attention: list[float], r: int, prefix: int) -> torch.Tensor:
    patches = sorted(range(prefix, len(attention)), key=lambda i: -attention[i])[: len(attention) - prefix - r]
    return x[list(range(prefix)) + sorted(patches)].double()


def naive_pool(x: torch.Tensor, k: torch.Tensor, r: int, prefix: int) -> torch.Tensor:
    """ToMe by its definition: A/B alternate, each A's best B by cosine, the r best A tokens average into it."""
    metric = k.double().mean(0)  # (N, D)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_a = list(range(prefix, N, 2))
    set_b = list(range(prefix + 1, N, 2))
    best = {a: max(set_b, key=lambda b: float(metric[a] @ metric[b])) for a in set_a}
    merged = sorted(set_a, key=lambda a: -float(metric[a] @ metric[best[a]]))[:r]
    groups = {i: [i] for i in range(N) if i not in merged}
    for a in merged:
        groups[best[a]].append(a)
    return torch.stack([x[groups[i]].double().mean(0) for i in sorted(groups)])


def layer_inputs(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(B, N, C)
    q = torch.randn(B, H, N, D)
    # Sharpen half the samples' class query so their attention concentrates (high variance: they prune).
    q[::2, :, 0] *= 4.0
    k = torch.randn(B, H, N, D)
    return x, q, k


@pytest.mark.parametrize("r", [1, 4, 9])
def test_mixed_batch_matches_the_naive_reference(r):
    x, q, k = layer_inputs()
    scale = D**-0.5
    attention = [naive_class_attention(q[b], k[b], scale) for b in range(B)]
    variances = [naive_variance(a, PREFIX) for a in attention]
    ranked = sorted(variances)
    threshold = (ranked[B // 2 - 1] + ranked[B // 2]) / 2  # half the batch prunes, half pools (no ties)
    method = PPT(PPTConfig(r=r, threshold=threshold))
    state = TokenState.start(x, PREFIX, trace_source=True)
    out = method.reduce(x, state, r, LayerContext(0, q, k, scale))
    prunes = [v >= threshold for v in variances]
    assert 0 < sum(prunes) < B
    assert method.prunes(LayerContext(0, q, k, scale).class_attention(), PREFIX).tolist() == prunes
    for b in range(B):
        expected = naive_prune(x[b], attention[b], r, PREFIX) if prunes[b] else naive_pool(x[b], k[b], r, PREFIX)
        torch.testing.assert_close(out[b].double(), expected, atol=1e-5, rtol=1e-5)
        # A pruned image drops r tokens outright; a pooled one keeps every token inside a merged group.
        assert float(state.dropped[b]) == (r if prunes[b] else 0)
        torch.testing.assert_close(state.source[b].sum(-1, keepdim=True), state.size[b])
    assert torch.all(state.index[:, 1:] > state.index[:, :-1])


def test_variance_is_scale_free_and_batch_rows_are_independent():
    x, q, k = layer_inputs(1)
    attention = LayerContext(0, q, k, D**-0.5).class_attention()
    torch.testing.assert_close(importance_variance(attention, PREFIX), importance_variance(3 * attention, PREFIX))
    method = PPT(PPTConfig(r=3, threshold=float(importance_variance(attention, PREFIX).median())))
    batched = method.reduce(x, TokenState.start(x, PREFIX), 3, LayerContext(0, q, k, D**-0.5))
    for b in range(B):
        one = method.reduce(
            x[b : b + 1],
            TokenState.start(x[b : b + 1], PREFIX),
            3,
            LayerContext(0, q[b : b + 1], k[b : b + 1], D**-0.5),
        )
        torch.testing.assert_close(batched[b : b + 1], one)


def test_threshold_extremes_are_pure_pruning_and_pure_pooling():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = tokenprune.apply(model, "ppt", r=[3, 3, 0], threshold=1e30)
        got_pool = model(images)
        dropped_pool = pooled.state.dropped.clone()
        pooled.remove()
        tome = tokenprune.apply(model, "tome", r=[3, 3, 0])
        want_pool = model(images)
        tome.remove()
        pruned = tokenprune.apply(model, "ppt", r=[3, 3, 0], threshold=0.0)
        model(images)
    torch.testing.assert_close(got_pool, want_pool)
    assert torch.all(dropped_pool == 0) and torch.all(pruned.state.dropped == 6)
    pruned.remove()
    with pytest.raises(ValueError, match="threshold"):
        tokenprune.apply(model, "ppt", r=1, threshold=-1.0)

"""timm forms: what is specific to one method or form (the shared exactness checks of every method x form,
zero reduction, remove(), sizes and indices, batch == one by one, FLOPs, run in test_vit_matrix).
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.conftest import MODELS, build


def _needs_cls_and_missing(method: str, model) -> bool:
    return method == "evit" and model.cls_token is None


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_merging_and_fusing_methods_drop_nothing(method, model_name):
    """ToMe merges and EViT fuses: every original token stays held (the shared accounting: test_vit_matrix)."""
    model, images, options = build(model_name)
    if _needs_cls_and_missing(method, model):
        pytest.skip("evit needs a class token")
    patch = tokenprune.apply(model, method, r=3, trace_source=True, **options)
    with torch.no_grad():
        model(images)
    state = patch.state
    assert torch.all(state.dropped == 0) and state.reduced
    assert torch.equal(state.source.sum(dim=1), torch.ones(2, state.num_original))  # sources partition the tokens
    patch.remove()


def test_random_is_seeded():
    model, images, _ = build("deit_tiny")
    outputs = []
    for _ in range(2):
        patch = tokenprune.apply(model, "random", r=5, seed=7)
        with torch.no_grad():
            outputs.append(model(images))
        patch.remove()
    assert torch.equal(outputs[0], outputs[1])


def test_unfused_and_fused_attention_agree_under_reduction():
    model, images, _ = build("deit_tiny")
    results = []
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused_attn = fused
        patch = tokenprune.apply(model, "tome", r=6)
        with torch.no_grad():
            results.append(model(images))
        patch.remove()
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["no_cls_avg", "cls_avgmax_unfused"])
def test_average_pooling_weights_merged_tokens_by_size(name):
    model, images, options = build(name)
    patch = tokenprune.apply(model, "tome", r=4, **options)
    with torch.no_grad():
        features = model.forward_features(images)
        pooled = model.pool(features)
    size = patch.state.size[:, model.num_prefix_tokens :]
    tokens = features[:, model.num_prefix_tokens :]
    weighted = (tokens * size).sum(1) / size.sum(1)
    if model.global_pool == "avgmax":
        weighted = 0.5 * (tokens.amax(1) + weighted)
    torch.testing.assert_close(pooled, weighted)
    assert not torch.allclose(pooled, tokens.mean(1) if model.global_pool == "avg" else pooled + 1)


def test_every_model_form_is_covered():
    assert {"deit_tiny", "dinov2_dynamic", "reg4_qknorm_layerscale", "no_cls_avg", "no_cls_map"} <= set(MODELS)

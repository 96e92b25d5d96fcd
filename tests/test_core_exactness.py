"""Exactness properties of every method x timm model form (the first tests of any method/adapter).

Tolerances: zero reduction and remove() are bit-exact (torch.equal); batch-vs-single comparisons use
atol=1e-5 in float32 (different batch shapes may take different matmul kernels).
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.conftest import MODELS, build

METHODS = ["none", "tome", "evit", "random"]


def _needs_cls_and_missing(method: str, model) -> bool:
    return method == "evit" and model.cls_token is None


def _reducing_r(method: str) -> int:
    return 0 if method == "none" else 3


@pytest.mark.parametrize("method", METHODS)
def test_zero_reduction_is_bit_exact(method, model_name):
    model, images, options = build(model_name)
    if _needs_cls_and_missing(method, model):
        pytest.skip("evit needs a class token (its error is tested separately)")
    with torch.no_grad():
        expected = model(images)
        patch = tokenprune.apply(model, method, r=0, **options)
        got = model(images)
    assert torch.equal(got, expected)
    assert len(patch.state.log) == len(model.blocks)
    assert all(e.tokens_in == e.tokens_out == patch.state.num_original for e in patch.state.log)
    patch.remove()


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_modules_and_outputs(method, model_name):
    model, images, options = build(model_name)
    if _needs_cls_and_missing(method, model):
        pytest.skip("evit needs a class token")
    module_types = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images)
        patch = tokenprune.apply(model, method, r=_reducing_r(method), **options)
        reduced = model(images)
        restored_model = patch.remove()
        restored = model(images)
    assert restored_model is model
    assert torch.equal(restored, expected)
    if method != "none":
        assert not torch.equal(reduced, expected)
    assert [(name, type(m)) for name, m in model.named_modules()] == module_types
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert "pool" not in model.__dict__ and not hasattr(model, "_tokenprune_patch")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", ["tome", "evit", "random"])
def test_sizes_indices_and_sources(method, model_name):
    model, images, options = build(model_name)
    if _needs_cls_and_missing(method, model):
        pytest.skip("evit needs a class token")
    patch = tokenprune.apply(model, method, r=3, trace_source=True, **options)
    with torch.no_grad():
        model(images)
    state = patch.state
    n0, prefix = state.num_original, state.num_protected
    assert state.num_tokens == n0 - sum(patch.runtime.schedule) < n0
    # Every original token is held by exactly one token or was dropped (random only).
    torch.testing.assert_close(state.size.sum(dim=(1, 2)) + state.dropped, torch.full((2,), float(n0)))
    if method != "random":
        assert torch.all(state.dropped == 0)
        assert torch.equal(state.source.sum(dim=1), torch.ones(2, n0))  # sources partition the tokens
    assert torch.all(state.source.sum(dim=1) <= 1)  # never in two tokens
    torch.testing.assert_close(state.source.sum(dim=-1, keepdim=True), state.size)
    # Kept indices: valid, strictly increasing (spatial order), prefix untouched, inside own source.
    index = state.index
    assert index.min() >= 0 and index.max() < n0
    assert torch.all(index[:, 1:] > index[:, :-1])
    assert torch.equal(index[:, :prefix], torch.arange(prefix).expand(2, prefix))
    assert torch.all(state.source.gather(2, index.unsqueeze(-1)) == 1)
    # Log follows the schedule layer by layer.
    assert [e.tokens_in - e.tokens_out for e in state.log] == patch.runtime.schedule
    patch.remove()


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_batch_equals_one_by_one(method, model_name):
    model, images, options = build(model_name)
    if _needs_cls_and_missing(method, model):
        pytest.skip("evit needs a class token")
    tokenprune.apply(model, method, r=3, **options)
    with torch.no_grad():
        batched = model(images)
        singles = torch.cat([model(images[i : i + 1]) for i in range(images.shape[0])])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tome", "evit", "random"])
def test_disabled_runs_the_original_path(method):
    model, images, options = build("deit_tiny")
    with torch.no_grad():
        expected = model(images)
        patch = tokenprune.apply(model, method, r=4, **options)
        with tokenprune.disabled(model):
            inside = model(images)
        after = model(images)
    assert torch.equal(inside, expected)
    assert not torch.equal(after, expected)
    assert patch.runtime.enabled


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
    assert {"deit_tiny", "dinov2_dynamic", "reg4_qknorm_layerscale", "no_cls_avg", "no_cls_map"} <= set(
        MODELS
    )

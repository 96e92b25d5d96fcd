"""Every ViT method x every ViT model form: the properties any method on any form must have.

Methods come from the registry (``tokenprune.methods(kind="vit")``): zero reduction runs with the method's
``identity`` options, reduction with its ``example`` options; a method declaring ``needs_class_token`` is skipped
on forms without one (its error is tested in the form's file). Forms are ``tests/helpers/vit_forms.py``.

Tolerances: zero reduction, ``disabled`` and ``remove()`` are bit-exact (``torch.equal``); batch-vs-one-by-one
1e-5 and sdpa-vs-eager 1e-4 (float32: other batch shapes / kernels); analytic FLOPs within 2% of torch's counter.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vit_forms import FORMS, build, outputs
from tokenprune import registry

METHODS = tokenprune.methods(kind="vit")


@pytest.fixture(params=sorted(FORMS))
def form(request) -> str:
    return request.param


@pytest.fixture(params=METHODS)
def method(request, form) -> str:
    if registry.get_method(request.param).method_cls.needs_class_token and not FORMS[form].has_class_token:
        pytest.skip(f"{request.param!r} needs a class token; {form} has none")
    return request.param


def reduces(method: str) -> bool:
    entry = registry.get_method(method)
    return entry.example != entry.identity


def deterministic(method: str) -> bool:
    """The method's declared ``batch_invariant``: False for random draws (a batch draws other numbers)."""
    return registry.get_method(method).method_cls.batch_invariant


def hooks(model: torch.nn.Module) -> dict:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_form_declares_its_class_token(form):
    model, _, options = build(form)
    method = next(m for m in METHODS if not registry.get_method(m).method_cls.needs_class_token)
    patch = tokenprune.apply(model, method, **registry.get_method(method).identity, **options)
    assert patch.adapter.has_class_token == FORMS[form].has_class_token


# ----------------------------------------------------------------- exactness
def test_zero_reduction_is_bit_exact(form, method):
    for attn in FORMS[form].attn or ("sdpa",):
        model, images, options = build(form, attn)
        with torch.no_grad():
            expected = outputs(model, images)
            patch = tokenprune.apply(model, method, **registry.get_method(method).identity, **options)
            got = outputs(model, images)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), attn
        assert len(patch.state.log) == FORMS[form].depth
        assert all(e.tokens_in == e.tokens_out == patch.state.num_original for e in patch.state.log)
        assert not patch.state.reduced


def test_remove_restores_modules_hooks_weights_and_outputs(form, method):
    model, images, options = build(form)
    module_types = [(n, type(m)) for n, m in model.named_modules()]
    hooks_before, attributes = hooks(model), set(vars(model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = outputs(model, images)
        patch = tokenprune.apply(model, method, **registry.get_method(method).example, **options)
        reduced = outputs(model, images)
        with tokenprune.disabled(model):
            inside = outputs(model, images)
        assert patch.runtime.enabled
        assert patch.remove() is model
        restored = outputs(model, images)
    assert all(torch.equal(i, e) for i, e in zip(inside, expected, strict=True))
    assert all(torch.equal(r, e) for r, e in zip(restored, expected, strict=True))
    assert not torch.equal(reduced[0], expected[0]) if reduces(method) else torch.equal(reduced[0], expected[0])
    assert [(n, type(m)) for n, m in model.named_modules()] == module_types
    assert hooks(model) == hooks_before and set(vars(model)) == attributes  # e.g. timm's pool put back
    if not FORMS[form].hf:  # timm adds no hooks of its own
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not hasattr(model, "_tokenprune_patch")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


# ----------------------------------------------------------------- what the state says
def test_sizes_indices_and_sources(form, method):
    """Sizes sum to the original count; kept indices are valid, sorted, inside their own source; log = schedule."""
    model, images, options = build(form)
    patch = tokenprune.apply(model, method, **registry.get_method(method).example, trace_source=True, **options)
    with torch.no_grad():
        out = model(images)
    state = patch.state
    n0, prefix = state.num_original, state.num_protected
    assert n0 == patch.adapter.num_tokens(FORMS[form].size)
    assert state.num_tokens == n0 - sum(patch.runtime.schedule)
    assert (state.num_tokens < n0) == reduces(method) == state.reduced
    if hasattr(out, "last_hidden_state"):  # documented: fewer tokens once reduced
        assert out.last_hidden_state.shape[1] == state.num_tokens
    # Every original token is held by exactly one token, or was dropped (and then counted in ``dropped``).
    torch.testing.assert_close(state.size.sum(dim=(1, 2)) + state.dropped, torch.full((2,), float(n0)))
    held = state.source.sum(dim=1)  # (B, n0)
    assert torch.all((held == 0) | (held == 1))
    torch.testing.assert_close((held == 0).sum(dim=1).to(state.dropped.dtype), state.dropped)
    torch.testing.assert_close(state.source.sum(dim=-1, keepdim=True), state.size)
    index = state.index
    assert index.min() >= 0 and index.max() < n0 and torch.all(index[:, 1:] > index[:, :-1])
    assert torch.equal(index[:, :prefix], torch.arange(prefix).expand(2, prefix))
    assert torch.all(state.source.gather(2, index.unsqueeze(-1)) == 1)
    assert [e.tokens_in - e.tokens_out for e in state.log] == patch.runtime.schedule
    assert len(patch.runtime.schedule) == FORMS[form].depth


def test_batch_equals_one_by_one(form, method):
    model, images, options = build(form)
    patch = tokenprune.apply(model, method, **registry.get_method(method).example, **options)
    with torch.no_grad():
        batched = outputs(model, images)
        counts = patch.state.num_tokens
        singles = [outputs(model, images[i : i + 1]) for i in range(images.shape[0])]
    assert patch.state.num_tokens == counts  # as many tokens kept alone as in the batch
    if not deterministic(method):
        pytest.skip(f"{method!r} draws other numbers in a batch: counts only")
    for index, tensor in enumerate(batched):
        torch.testing.assert_close(tensor, torch.cat([s[index] for s in singles]), atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_agree_under_reduction(form, method):
    if not FORMS[form].attn:
        pytest.skip("timm forms: fused vs unfused attention is tested in test_core_exactness")
    results = []
    for attn in FORMS[form].attn:
        model, images, options = build(form, attn)
        patch = tokenprune.apply(model, method, **registry.get_method(method).example, **options)
        with torch.no_grad():
            results.append((outputs(model, images), patch.state.index))
        assert patch.state.num_tokens == patch.state.num_original - sum(patch.runtime.schedule)
    (sdpa, sdpa_index), (eager, eager_index) = results
    for s, e in zip(sdpa, eager, strict=True):
        torch.testing.assert_close(s, e, atol=1e-4, rtol=1e-4)
    if deterministic(method):
        assert torch.equal(sdpa_index, eager_index)


# ----------------------------------------------------------------- FLOPs
def test_analytic_flops_match_the_flop_counter(form, method):
    model, images, options = build(form)
    full = tokenprune.count_flops(model, images)
    assert full.analytic == pytest.approx(full.measured, rel=0.02)
    assert [row["tokens_in"] - row["tokens_out"] for row in full.layers] == [0] * FORMS[form].depth
    patch = tokenprune.apply(model, method, **registry.get_method(method).example, **options)
    report = tokenprune.count_flops(model, images)
    assert report.analytic == pytest.approx(report.measured, rel=0.02)
    assert len(report.layers) == FORMS[form].depth
    assert [row["tokens_in"] - row["tokens_out"] for row in report.layers] == patch.runtime.schedule
    assert (report.measured < full.measured) == reduces(method)


@pytest.mark.parametrize("step", [0, 1])
def test_flops_budget_lands_within_two_percent(form, method, step):
    if not reduces(method):
        pytest.skip(f"{method!r} removes no tokens: it takes no budget")
    target = FORMS[form].budgets[step]
    model, images, options = build(form)
    baseline = tokenprune.count_flops(model, images[:1]).measured
    patch = tokenprune.apply(model, method, flops=target, **options)
    reduced = tokenprune.count_flops(model, images[:1]).measured
    assert reduced / baseline == pytest.approx(target, abs=0.02 * target)
    assert len(patch.schedule) == FORMS[form].depth

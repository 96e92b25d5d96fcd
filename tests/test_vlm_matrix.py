"""Every vision-language method x every VLM family: the properties any method on any family must have.

Methods come from the registry (``tokenprune.methods(kind="vlm")``): zero reduction runs with the method's
``identity`` options, reduction with its ``example`` options (plus what a family needs, e.g. Qwen2-VL's
``merge_positions``, for methods whose config has that field). Families and their prompts are the cases of
``tests/helpers/vlm_families.py``. What is specific to one family (layouts, spans, positions, exact per-layer
counts of one method, references run by hand) stays in that family's file.

Tolerances: bit-exact (``torch.equal``) where nothing is reduced and after ``remove()``; 1e-5 (float32) for
batch-vs-alone, and for sdpa-vs-eager the case's ``float_atol`` (1e-5; 2e-5 for Qwen3.5's recurrence); analytic
FLOPs == torch's flop counter to 1e-9 (relative).
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import FAMILIES, VLMCase, families, skip_without_tower_merging
from tests.vlm_checks import (
    assert_batch_rows_equal_alone,
    assert_batched_generate_equals_alone,
    assert_remove_restores,
    assert_zero_reduction_exact,
)
from tokenprune import registry
from tokenprune.methods.vlm import VisualTokenMethod

METHODS = tokenprune.methods(kind="vlm")


@pytest.fixture(params=FAMILIES)
def case(request) -> VLMCase:
    return families()[request.param]


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _tower_merging(request) -> None:
    """A ViT method (e.g. ``tome``) runs inside the vision tower: skip families that declare they cannot."""
    if {"case", "method"} <= set(request.fixturenames):
        skip_without_tower_merging(request.getfixturevalue("case").name, request.getfixturevalue("method"))


def identity(case: VLMCase, method: str) -> dict:
    entry = registry.get_method(method)
    return case.options_for(entry.config_cls, entry.identity)


def example(case: VLMCase, method: str) -> dict:
    entry = registry.get_method(method)
    return case.options_for(entry.config_cls, entry.example)


def reduces(method: str) -> bool:
    """Whether the method's example options remove tokens (a method whose example is its identity never does)."""
    entry = registry.get_method(method)
    return entry.example != entry.identity


def prunes_text(method: str) -> bool:
    """Whether the method prunes text tokens too (``prunes_text``, LazyLLM): then every real token but the
    structural ones and each prompt's last may go, and a text-only prompt is reduced as well."""
    cls = registry.get_method(method).method_cls
    return issubclass(cls, VisualTokenMethod) and cls.prunes_text  # a ViT method in the tower (tome) never does


def deterministic(method: str) -> bool:
    """The method's declared ``batch_invariant``: False for random draws, whose batch keeps as many tokens per
    sample as each alone, not the same ones."""
    return registry.get_method(method).method_cls.batch_invariant


def budget(case: VLMCase, method: str, flops: float) -> dict | None:
    """Options asking ``method`` for a FLOPs budget, or None if its config refuses one (it takes no budget)."""
    entry = registry.get_method(method)
    if not issubclass(entry.method_cls, VisualTokenMethod):
        return None  # a ViT method in the vision tower: its flops= is a fraction of the tower's FLOPs, not the LLM's
    if entry.method_cls.whole_videos:
        return None  # images keep every token: the budget tests of a temporal method run on videos (test_dycoke)
    options = case.options_for(entry.config_cls, {"flops": flops})
    try:
        entry.config_cls.from_dict(options)
    except (TypeError, ValueError):
        return None
    return options


def visual_samples(case: VLMCase) -> list[str]:
    return [name for name in case.samples if case.has_visual(name)]


def llm_flops(rows: list[dict]) -> float:
    return sum(row["flops"] for row in rows)


# ----------------------------------------------------------------------------- exactness first
def test_zero_reduction_is_bit_exact(case, method):
    """Identity options: bit-equal logits and greedy tokens, on one prompt and on every padded batch."""
    model = case.build()
    x = case.inputs(["a"])
    patch = assert_zero_reduction_exact(model, x, method, identity(case, method), case.greedy)
    length = len(case.samples["a"])
    assert patch.state.tokens_per_layer() == [(length, length)] * case.depth
    assert patch.schedule == [1.0] * case.depth
    patch.remove()
    x = case.inputs(list(case.batches[-1]))  # a padded batch (with videos where the family has them)
    assert_zero_reduction_exact(model, x, method, identity(case, method), case.greedy).remove()


def test_remove_restores_modules_hooks_weights_and_outputs(case, method):
    options = example(case, method)
    assert_remove_restores(case.build(), case.inputs(["a"]), method, options, case.greedy, reduces(method))


# ----------------------------------------------------------------------------- lengths follow the state
def cached_lengths(cache, expected: list[int]) -> tuple[list[int], list[int]]:
    """``(cached, expected)`` tokens per layer, over the layers whose cache holds keys (a linear-attention
    layer holds a recurrent state instead, Qwen3.5: ``tests/test_hf_qwen3_5.py`` checks it)."""
    layers = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None]
    return [cache.layers[i].keys.shape[-2] for i in layers], [expected[i] for i in layers]


def test_sequence_and_cache_lengths_follow_the_state(case, method):
    """Per layer: sequence length, KV-cache length and kept positions agree with ``patch.state``; text stays."""
    model = case.build()
    patch = tokenprune.apply(model, method, **example(case, method))
    for name in visual_samples(case):  # generate() on the first only
        ids = case.samples[name]
        x = case.inputs([name])
        with torch.no_grad():
            out = model(**x)
        state = patch.state
        lengths = [n for n, _ in state.tokens_per_layer()]
        assert len(lengths) == case.depth
        assert [n for _, n in state.tokens_per_layer()] == lengths[1:] + lengths[-1:]
        cached, expected = cached_lengths(out.cache, lengths)
        assert cached == expected  # each attention layer caches what it saw
        assert out.logits.shape[1] == lengths[-1] == state.num_tokens
        assert [index.shape[1] for index in state.index_in] == lengths
        assert state.prunable_per_layer() == state.targets_list
        structural = 0 if state.structural is None else int(state.structural[0].sum())
        visual = sum(t in case.visual_ids for t in ids) - structural
        text = [i for i, t in enumerate(ids) if t not in case.visual_ids]
        # What may never go: text (unless the method prunes text), structural tokens, and the last prompt token.
        for layer, index in enumerate(state.index_in):
            index = index[0].tolist()
            kept_text = [i for i in index if ids[i] not in case.visual_ids]
            assert index == sorted(index) and len(ids) - 1 in index, layer
            assert kept_text == text if not prunes_text(method) else set(kept_text) <= set(text), layer
            assert sum(ids[i] in case.visual_ids for i in index) - structural == state.visual_in[layer][0], layer
            if not prunes_text(method):
                assert state.visual_in[layer].tolist() == state.targets_list[layer], layer
        source = state.source[0].tolist()  # the input position standing for each input position, -1: dropped
        entering = set(state.index_in[0][0].tolist())
        assert all(source[i] == i for i in text) and all(s == -1 or s in entering for s in source)
        for slot, position in enumerate(state.index[0].tolist()):  # sizes are the groups the sources form
            assert position < 0 or source.count(position) == state.size[0, slot], (slot, position)
        if reduces(method):
            assert state.reduced and lengths[-1] < len(ids)  # pre-LLM methods reduce before layer 0
            if prunes_text(method):  # text really goes too (the example keeps 36% of the prunable tokens)
                assert sum(ids[i] not in case.visual_ids for i in state.index_in[-1][0].tolist()) < len(text)
            else:
                assert state.visual_in[-1][0] < visual
        else:
            assert not state.reduced and lengths == [len(ids)] * case.depth

        if name != "a":
            continue
        steps = case.steps
        with torch.no_grad():
            generated = case.greedy(model, x, steps, return_dict_in_generate=True)
        assert generated.sequences.shape[1] == len(ids) + steps
        fed = steps - 1  # the last generated token is never fed back
        grown = [n + fed for n in lengths]
        aux = getattr(patch.adapter.reducer, "aux", {}).get(generated.cache)  # LazyLLM's: revived tokens join too
        if aux is not None:
            for _, layer, index in aux.revived:
                grown[layer] += index.shape[1]
            assert [slots.shape[1] for slots in aux.slots] == grown
        cached, expected = cached_lengths(generated.cache, grown)
        assert cached == expected
        if reduces(method):  # decode steps on a compact cache are counted (an unreduced cache is HF's own)
            assert patch.state.generated == fed


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_samples_run_alone(case, method, side):
    model = case.build()
    patch = tokenprune.apply(model, method, **example(case, method))
    for names in case.batches:
        with torch.no_grad():
            batched = model(**case.inputs(list(names), side)).logits
        state = patch.state
        singles = [case.inputs([n]) for n in names]
        exact = [deterministic(method)] * len(names)
        assert_batch_rows_equal_alone(model, patch, batched, state, singles, case.lengths(list(names)), side, exact)


def test_batched_generate_equals_samples_alone(case, method):
    """Left-padded batches (beam search, where the case asks, reorders the compact cache too) == each alone."""
    model = case.build()
    patch = tokenprune.apply(model, method, **example(case, method))
    for beams in case.beams:
        for names in case.batches:
            singles = [case.inputs([n]) for n in names]
            greedy = functools.partial(case.greedy, num_beams=beams)
            if not deterministic(method):  # other draws in a batch: it runs, its tokens are not compared
                with torch.no_grad():
                    tokens = greedy(model, case.inputs(list(names)))
                assert tokens.shape == (len(names), max(case.lengths(names)) + case.steps)
                continue
            assert_batched_generate_equals_alone(model, greedy, case.inputs(list(names)), singles, case.lengths(names))
            if reduces(method):
                assert patch.state.generated == case.steps - 1


def test_sdpa_and_eager_agree(case, method):
    results = []
    for attn in ("sdpa", "eager"):
        model = case.build(attn)
        patch = tokenprune.apply(model, method, **example(case, method))
        with torch.no_grad():
            results.append((model(**case.inputs(["a"])).logits, patch.state))
    (sdpa, sdpa_state), (eager, eager_state) = results
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=case.float_atol)
    assert torch.equal(sdpa_state.index, eager_state.index) and torch.equal(sdpa_state.valid, eager_state.valid)
    assert sdpa_state.tokens_per_layer() == eager_state.tokens_per_layer()
    assert sdpa_state.visual_per_layer() == eager_state.visual_per_layer()
    assert all(torch.equal(s, e) for s, e in zip(sdpa_state.index_in, eager_state.index_in, strict=True))


# ----------------------------------------------------------------------------- FLOPs
def test_analytic_flops_equal_the_flop_counter(case, method):
    """Vision tower + projector + merging + every LLM layer (+ scoring) + LM head, as torch counts them."""
    model = case.build()
    names = [n for n in ("a", "mixed") if n in case.samples]
    full = {name: tokenprune.count_flops(model, case.inputs([name])) for name in names}
    for report in full.values():
        assert report.analytic == pytest.approx(report.measured, rel=1e-9)
    for options in (example(case, method), budget(case, method, 0.8)):
        if options is None:
            continue
        patch = tokenprune.apply(model, method, **options)
        for name in names:
            reduced = tokenprune.count_flops(model, case.inputs([name]))
            assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9)
            assert patch.adapter.flops_for(patch.state)["total"] == pytest.approx(reduced.measured, rel=1e-9)
            assert reduced.embed > 0
            assert [row["tokens_in"] for row in reduced.layers] == [n for n, _ in patch.state.tokens_per_layer()]
            if reduces(method) or "flops" in options:
                assert reduced.measured < full[name].measured
                assert reduced.layers[-1]["tokens_out"] < full[name].layers[-1]["tokens_out"]
            else:
                assert reduced.measured == pytest.approx(full[name].measured, rel=1e-12)
        patch.remove()


def test_flops_budget_is_a_fraction_of_llm_prefill(case, method):
    options = budget(case, method, 0.75)
    if options is None:
        pytest.skip(f"{method!r} takes no FLOPs budget")
    model = case.build()
    x = case.inputs(["a"])
    full = llm_flops(tokenprune.count_flops(model, x).layers)
    patch = tokenprune.apply(model, method, **options)
    assert patch.schedule is None  # solved per prompt
    report = tokenprune.count_flops(model, x)
    # One visual token more or less moves the cost by a fraction of a layer: the closest reachable budget.
    assert abs(llm_flops(report.layers) / full - 0.75) < 0.03
    assert llm_flops(patch.adapter.flops_for(patch.state)["layers"]) == pytest.approx(llm_flops(report.layers))
    assert patch.state.reduced


# ----------------------------------------------------------------------------- prompts without visual tokens
@pytest.mark.parametrize("tokens", [3, 20])
def test_tokens_gives_exactly_that_many_per_image(case, method, tokens):
    """``tokens=N`` (methods acting before the LLM): every image span keeps exactly N (one with fewer keeps all),
    alone and in a padded batch; the count is the plan's, known before the tower runs."""
    entry = registry.get_method(method)
    if "tokens" not in entry.config_cls.field_names():
        pytest.skip(f"{method!r} takes no tokens= count")
    model = case.build()
    patch = tokenprune.apply(model, method, **case.options_for(entry.config_cls, {"tokens": tokens}))
    for names in [[name] for name in visual_samples(case)] + [list(case.batches[0])]:
        with torch.no_grad():
            model(**case.inputs(names))
        state = patch.state
        expected = [sum(min(tokens, n) for n in spans) for spans in state.spans]
        assert state.visual_in[0].tolist() == expected, names
        assert expected == [sum(patch.runtime.method.merged_count(n, 0.0) for n in spans) for spans in state.spans]
    patch.remove()


def test_text_only_prompt_runs_unreduced(case, method):
    """A prompt with no image runs exactly as unpatched, with the example options and under a FLOPs budget (a
    method that prunes text prunes it: only its last token is sure to stay)."""
    model = case.build()
    x = case.inputs(["text"])
    # A method that prunes text reaches 0.5 on this short prompt on some families only (each layer's own cost).
    for options in (example(case, method), budget(case, method, 0.8 if prunes_text(method) else 0.5)):
        if options is None:
            continue
        if prunes_text(method):
            patch = tokenprune.apply(model, method, **options)
            with torch.no_grad():
                model(**x)
            state, length = patch.state, len(case.samples["text"])
            assert state.reduced and state.num_tokens < length and state.index[0, -1] == length - 1
            assert state.visual_per_layer() == [[0]] * case.depth
            patch.remove()
            continue
        patch = assert_zero_reduction_exact(model, x, method, options, case.greedy)
        length = len(case.samples["text"])
        assert patch.state.tokens_per_layer() == [(length, length)] * case.depth
        assert patch.state.visual_per_layer() == [[0]] * case.depth
        patch.remove()


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_mixing_text_only_and_image_prompts(case, method, side):
    """An image prompt and a text-only one in one padded batch == each alone; the text one is never reduced."""
    model = case.build()
    names = ["a", "text"]
    singles, lengths = [case.inputs([n]) for n in names], case.lengths(names)
    for options in (example(case, method), budget(case, method, 0.8)):
        if options is None:
            continue
        patch = tokenprune.apply(model, method, **options)
        with torch.no_grad():
            batched = model(**case.inputs(names, side)).logits
        state = patch.state
        assert [visual[1] for visual in state.visual_per_layer()] == [0] * case.depth
        exact = [deterministic(method), True]  # the text-only prompt's rows: always exactly as alone
        assert_batch_rows_equal_alone(model, patch, batched, state, singles, lengths, side, exact)
        if side == "left" and deterministic(method) and options is not None and "flops" not in options:
            assert_batched_generate_equals_alone(model, case.greedy, case.inputs(names), singles, lengths)
        patch.remove()

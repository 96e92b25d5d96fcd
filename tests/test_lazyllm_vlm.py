"""LazyLLM on vision-language models: visual and text prompt tokens pruned, revived tokens exact, original positions.

The shared matrix (``tests/test_vlm_matrix.py``) runs lazyllm on every family (exactness, batches, caches, FLOPs);
here what is LazyLLM's own: text really goes, the last prompt token and structural tokens stay, and a revived
token's keys/values (rotary-embedded at its original, for Qwen 3-axis, position) and hidden state equal the
unpruned model's where nothing before it changed.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import families
from tokenprune import registry

CLOSE = {"atol": 2e-5, "rtol": 1e-5}


def language_layers(model):
    return registry.find_adapter(model)(model).language_model.layers


def unpruned_run(case, model, x):
    """Every language-model layer's output hidden states and the KV cache of the unpatched model on ``x``."""
    outputs = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, a, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(language_layers(model))
    ]
    with torch.no_grad():
        cache = model(**x, use_cache=True).past_key_values
    for hook in hooks:
        hook.remove()
    return outputs, cache


@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl", "llava-onevision"])
def test_kept_and_revived_tokens_equal_the_unpruned_model(name):
    """Pruned after layer 1 only, two new tokens (the second's decode step revives). Layer 2's cache holds the kept
    tokens' keys/values as the unpruned model's (layers 0-1 saw every token; the keys carry the original rotary
    position, 3-axis for Qwen2-VL); a revived token with every earlier prompt token in layer 2's cache has the
    unpruned keys/values at layers 2 and 3 (its layer-1 state resumed), and if no earlier token was pruned at
    all, its layer-3 output (held in the aux cache) is the unpruned model's too."""
    case = families()[name]
    model = case.build()
    x = case.inputs(["a"])
    length = x["input_ids"].shape[1]
    reference, full_cache = unpruned_run(case, model, x)
    checked = {"kept": 0, "kv": 0, "hidden": 0}
    for keep in (0.5, 0.8, 0.9, 0.95):
        patch = tokenprune.apply(
            model, "lazyllm", layers=(1,), keep=keep, **case.options_for(registry.get_method("lazyllm").config_cls, {})
        )
        assert patch.runtime.method.revives
        with torch.no_grad():
            out = case.greedy(model, x, 2, return_dict_in_generate=True)
        cache = out.past_key_values
        aux = patch.adapter.reducer.aux[cache]
        kept = patch.state.index_in[2][0].tolist()
        pruned = set(range(length)) - set(kept)
        assert pruned and length - 1 in kept
        ours, full = cache.layers[2], full_cache.layers[2]
        for slot, position in enumerate(kept):  # the prefill's part of layer 2's cache
            torch.testing.assert_close(ours.keys[0, :, slot], full.keys[0, :, position], **CLOSE)
            torch.testing.assert_close(ours.values[0, :, slot], full.values[0, :, position], **CLOSE)
            checked["kept"] += 1
        revived = {p for _, _, index in aux.revived for p in index[0].tolist() if p >= 0}
        assert revived <= pruned
        slots = aux.slots[2][0].tolist()
        assert aux.slots[3][0].tolist() == slots  # no pruning after layer 2: the same tokens revived at 3
        for position in sorted(revived):
            if not all(p in slots for p in range(position)):
                continue
            kv = slots.index(position)
            for layer in (2, 3):
                ours, full = cache.layers[layer], full_cache.layers[layer]
                torch.testing.assert_close(ours.keys[0, :, kv], full.keys[0, :, position], **CLOSE)
                torch.testing.assert_close(ours.values[0, :, kv], full.values[0, :, position], **CLOSE)
            checked["kv"] += 1
            if position == min(pruned):
                slot = aux.aux[3].index[0].tolist().index(position)
                torch.testing.assert_close(aux.aux[3].hidden[0, slot], reference[3][0, position], **CLOSE)
                checked["hidden"] += 1
        patch.remove()
    assert checked["kept"] and checked["kv"] and checked["hidden"], f"too few tokens to check: {checked}"


@pytest.mark.parametrize("name", ["llava-llama", "llava-onevision", "mistral3"])
def test_text_and_visual_tokens_go_last_and_structural_stay(name):
    """Each pruning layer keeps round(keep x present) of the prunable tokens (visual and text alike): every real
    token but the structural ones and the last; text tokens really leave; structural ones and the last stay."""
    case = families()[name]
    model = case.build()
    patch = tokenprune.apply(model, "lazyllm", layers=(0, 2), keep=0.5)
    ids = case.samples["a"]
    with torch.no_grad():
        model(**case.inputs(["a"]))
    state = patch.state
    structural = [] if state.structural is None else state.index[0][state.structural[0]].tolist()
    prunable = len(ids) - 1 - len(structural)
    assert state.prunable_per_layer() == [[prunable]] + [[state.targets_list[1][0]]] * 2 + [[state.targets_list[3][0]]]
    assert state.targets_list[1][0] < prunable and state.targets_list[3][0] < state.targets_list[1][0]
    text = [i for i, t in enumerate(ids) if t not in case.visual_ids]
    last = state.index_in[-1][0].tolist()
    assert len(ids) - 1 in last and set(structural) <= set(last)
    kept_text = [i for i in last if i in text]
    kept_visual = [i for i in last if ids[i] in case.visual_ids and i not in structural]
    assert 0 < len(kept_text) < len(text) and len(kept_visual) < sum(t in case.visual_ids for t in ids)
    assert len(last) == len(ids) - (prunable - state.targets_list[3][0])
    assert state.visual_in[-1][0] == sum(ids[i] in case.visual_ids for i in last) - len(structural)
    if name == "llava-onevision":
        assert structural, "the case's image_newline tokens are structural"
    patch.remove()


@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl"])
def test_generate_equals_unpatched_when_nothing_is_pruned(name):
    """keep=1.0 at every pruning layer: generate() (revival bookkeeping armed) equals the unpatched model's."""
    case = families()[name]
    model = case.build()
    x = case.inputs(list(case.batches[0]))
    with torch.no_grad():
        expected = case.greedy(model, x, 4)
        patch = tokenprune.apply(model, "lazyllm", layers=(0, 1, 2), keep=1.0)
        assert torch.equal(case.greedy(model, x, 4), expected)
    assert not patch.state.reduced
    patch.remove()


def test_revival_refused_where_the_family_cannot():
    """Gemma 3 (sliding windows, its own masks) and Qwen3.5 (recurrent layers) decode without revival by default;
    revive=True is refused with what to pass. Qwen3-VL revives unless a pruning layer is a DeepStack layer."""
    for name in ("gemma3", "qwen3.5"):
        case = families()[name]
        model = case.build()
        options = case.options_for(registry.get_method("lazyllm").config_cls, {})
        patch = tokenprune.apply(model, "lazyllm", **options)
        assert not patch.runtime.method.revives and not hasattr(patch.adapter.reducer, "aux")
        patch.remove()
        with pytest.raises(NotImplementedError, match="revive=False"):
            tokenprune.apply(model, "lazyllm", revive=True, **options)
    case = families()["qwen3-vl"]
    model = case.build()
    options = case.options_for(registry.get_method("lazyllm").config_cls, {})
    with pytest.raises(NotImplementedError, match="DeepStack"):
        tokenprune.apply(model, "lazyllm", layers=(1, 2), revive=True, **options)
    patch = tokenprune.apply(model, "lazyllm", layers=(2,), keep=0.5, revive=True, **options)
    assert patch.runtime.method.revives
    with torch.no_grad():
        out = case.greedy(model, case.inputs(["a"]), 3, return_dict_in_generate=True)
    assert patch.adapter.reducer.aux[out.past_key_values].revived  # decode steps after DeepStack's layers revive
    patch.remove()

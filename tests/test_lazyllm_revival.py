"""LazyLLM's aux cache: revived tokens resume exactly where they were pruned, and the caches stay consistent."""

from __future__ import annotations

import torch

import tokenprune
from tests.helpers.decoder_families import PROMPTS, build, family, inputs


def unpruned_layer_outputs(model, x):
    """Every layer's output hidden states and KV cache of the unpatched model on the prompt ``x``."""
    outputs = {}
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        cache = model(**x, use_cache=True).past_key_values
    for hook in hooks:
        hook.remove()
    return outputs, cache


@family
def test_revived_token_equals_unpruned_model(name):
    """Pruned after layer 1 only, one decode step. A revived token with every earlier prompt token in layer 2's cache
    has the unpruned model's keys/values at layers 2 and 3 (its layer-1 state resumed); if no earlier token was ever
    pruned (nothing before it changed), its layer-3 output (held in the aux cache) is the unpruned model's too."""
    model = build(name)
    x = inputs(["a"])
    reference, full_cache = unpruned_layer_outputs(model, x)
    checked = {"kv": 0, "hidden": 0}
    close = {"atol": 2e-5, "rtol": 1e-5}
    for keep in (0.5, 0.7, 0.8):
        patch = tokenprune.apply(model, "lazyllm", layers=(1,), keep=keep)
        with torch.no_grad():  # two new tokens: the prefill's, then one decode step (which revives)
            out = model.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values
        aux = patch.adapter.aux_cache(cache)
        pruned = set(range(len(PROMPTS["a"]))) - set(patch.state.index_in[2][0].tolist())
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
                torch.testing.assert_close(ours.keys[0, :, kv], full.keys[0, :, position], **close)
                torch.testing.assert_close(ours.values[0, :, kv], full.values[0, :, position], **close)
            checked["kv"] += 1
            if position == min(pruned):
                slot = aux.aux[3].index[0].tolist().index(position)
                torch.testing.assert_close(aux.aux[3].hidden[0, slot], reference[3][0, position], **close)
                checked["hidden"] += 1
        patch.remove()
    assert checked["kv"] and checked["hidden"], f"too few revived tokens to check: {checked} (seeds changed?)"


@family
def test_caches_consistent_over_steps(name):
    """After several decode steps of a padded batch: each layer's cache, its slot positions and the mask bookkeeping
    agree; a layer's tokens are among the previous layer's; the aux cache holds exactly what the next layer lacks."""
    model = build(name)
    patch = tokenprune.apply(model, "lazyllm", layers=(0, 2), keep=0.5)
    x = inputs(["a", "b"], "left")
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    aux = patch.adapter.aux_cache(cache)
    session = patch.adapter.reducer.sessions[cache]
    assert aux.revived, "nothing revived in six steps"
    for layer in range(4):
        slots = aux.slots[layer]
        assert cache.layers[layer].keys.shape[2] == slots.shape[1] == session.key_length[layer]
        if session.key_valid[layer] is not None:
            assert torch.equal(session.key_valid[layer], slots >= 0)
    for row in range(2):
        held = [set(s[row][s[row] >= 0].tolist()) for s in aux.slots]
        for layer in range(3):
            assert held[layer + 1] <= held[layer]
            entries = aux.aux[layer]
            parked = set() if entries is None else set(entries.index[row][entries.index[row] >= 0].tolist())
            assert parked == held[layer] - held[layer + 1]
        generated = set(range(x["input_ids"].shape[1], x["input_ids"].shape[1] + 5))
        assert all(generated <= h for h in held)  # decoded tokens are never pruned
    patch.remove()


@family
def test_without_revival_decodes_on_the_prefill_cache(name):
    model = build(name)
    x = inputs(["a"])
    tokens = {}
    for revive in (False, True):
        patch = tokenprune.apply(model, "lazyllm", layers=(0, 2), keep=0.5, revive=revive)
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        prefill = [entry.tokens_in for entry in patch.state.log]
        if revive:
            assert lengths[1:] >= [n + 3 for n in prefill[1:]] and lengths != [n + 3 for n in prefill]
        else:
            assert patch.adapter.aux_cache(out.past_key_values) is None
            assert lengths == [n + 3 for n in prefill]  # three decode steps, one token each, nothing revived
        tokens[revive] = out.sequences
        patch.remove()
    assert torch.equal(tokens[False][:, : len(PROMPTS["a"]) + 1], tokens[True][:, : len(PROMPTS["a"]) + 1])


def test_disabled_decode_ends_revival():
    model = build("llama")
    patch = tokenprune.apply(model, "lazyllm", layers=(0, 2), keep=0.5)
    x = inputs(["a"])
    with torch.no_grad():
        out = model(**x, use_cache=True)
        cache = out.past_key_values
        step = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(1, x["input_ids"].shape[1] + 1, dtype=torch.long)
        with tokenprune.disabled(model):
            model(input_ids=step, attention_mask=mask, cache=cache, use_cache=True)
        assert not patch.adapter.aux_cache(cache).active
        mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
        model(input_ids=step, attention_mask=mask, cache=cache, use_cache=True)  # runs, unrevived
    assert [layer.keys.shape[2] for layer in cache.layers] == [e.tokens_in + 2 for e in patch.state.log]
    patch.remove()


@family
def test_beam_search_reorders_the_aux_cache(name):
    """Beams of one prompt revive different tokens: reordering the cache must reorder the aux cache with it. Every
    prompt token layer 1 holds (kept or revived after layer 0) has the unpruned model's layer-1 keys, in every beam
    row, only if each row's slot positions follow that row's cache."""
    model = build(name)
    differing = 0
    for keep in (0.5, 0.3):
        for sample in ("a", "b"):
            x = inputs([sample])
            _, full_cache = unpruned_layer_outputs(model, x)
            patch = tokenprune.apply(model, "lazyllm", layers=(0, 2), keep=keep)
            with torch.no_grad():
                out = model.generate(**x, max_new_tokens=6, num_beams=3, do_sample=False, return_dict_in_generate=True)
            cache = out.past_key_values
            slots, length = patch.adapter.aux_cache(cache).slots[1], len(PROMPTS[sample])
            differing += len({tuple(row.tolist()) for row in slots}) > 1
            for row in range(slots.shape[0]):
                for slot, position in enumerate(slots[row].tolist()):
                    if 0 <= position < length:
                        ours, full = cache.layers[1].keys[row, :, slot], full_cache.layers[1].keys[0, :, position]
                        torch.testing.assert_close(ours, full, atol=2e-5, rtol=1e-5)
            patch.remove()
    assert differing, "the beams always revived the same tokens: nothing checked the reordering"
    patch = tokenprune.apply(model, "lazyllm", layers=(0, 2), keep=0.5)
    with torch.no_grad():
        batch = model.generate(**inputs(["a", "b"], "left"), max_new_tokens=5, num_beams=3, do_sample=False)
        for row, sample in enumerate(("a", "b")):
            alone = model.generate(**inputs([sample]), max_new_tokens=5, num_beams=3, do_sample=False)[0]
            assert batch[row, -5:].tolist() == alone[-5:].tolist()
    patch.remove()

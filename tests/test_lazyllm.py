"""LazyLLM on text-only decoders (Llama, Qwen2, Qwen3): exactness, an independent prefill reference, revival."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.decoder_families import PROMPTS, build, family, inputs
from tokenprune.methods.vlm import count

OPTIONS = {"layers": (0, 2), "keep": 0.5}


def greedy(model, x, steps=4, **kwargs):
    return model.generate(**x, max_new_tokens=steps, do_sample=False, **kwargs)


# ----------------------------------------------------------------------------------------------- exactness
@family
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_reduction_is_bit_exact(name, attn):
    model = build(name, attn)
    for x in (inputs(["a"]), inputs(["a", "b"], "left")):
        with torch.no_grad():
            logits, tokens = model(**x).logits, greedy(model, x)
            patch = tokenprune.apply(model, "lazyllm", keep=1.0)
            assert torch.equal(model(**x).logits, logits)
            assert torch.equal(greedy(model, x), tokens)
            patch.remove()


@family
def test_remove_restores_exactly(name):
    model = build(name)
    layers = list(model.model.layers)
    x = inputs(["a", "b"], "right")
    with torch.no_grad():
        logits = model(**x).logits
        patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
        assert model(**x).logits.shape[1] < logits.shape[1]
        greedy(model, inputs(["a"]))
        patch.remove()
        assert list(model.model.layers) == layers
        assert not model.model._forward_pre_hooks and not model._forward_pre_hooks
        assert all(not layer._forward_hooks for layer in layers)
        assert torch.equal(model(**x).logits, logits)


# ------------------------------------------------------------------------------- an independent reference
def reference_prefill(name, prompt, layers, keep):
    """Float32 eager run of one prompt done by hand: each layer on the kept tokens at their original positions,
    pruning after ``layers`` by the last token's head-averaged attention weights (HF's own eager softmax).

    Returns:
        ``(kept, logits)``: the positions entering each layer, and the last token's logits.
    """
    model = build(name, "eager")
    lm = model.model
    ids = torch.tensor([prompt])
    length = len(prompt)
    weights = {}
    hooks = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: weights.__setitem__(i, out[1]))
        for i, layer in enumerate(lm.layers)
    ]
    with torch.no_grad():
        h = lm.embed_tokens(ids)
        positions = torch.arange(length)
        cos, sin = lm.rotary_emb(h, positions[None])
        cur, kept, stage = positions, [], 0
        for i, layer in enumerate(lm.layers):
            kept.append(cur.tolist())
            n = len(cur)
            causal = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo().min)
            h = layer(h, attention_mask=causal[None, None], position_embeddings=(cos[:, cur], sin[:, cur]))
            if i in layers:
                stage += 1
                scores = weights[i][0, :, -1, :-1].mean(dim=0)  # (n - 1,): the last token's row, head-averaged
                k = count(keep**stage, length - 1)
                top = scores.topk(k).indices.sort().values
                rows = torch.cat([top, torch.tensor([n - 1])])
                h, cur = h[:, rows], cur[rows]
        logits = model.lm_head(lm.norm(h))[0, -1]
    for hook in hooks:
        hook.remove()
    return kept, logits


@family
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_equals_reference(name, attn):
    model = build(name, attn)
    for sample in ("a", "b"):
        kept, ref = reference_prefill(name, PROMPTS[sample], (0, 2), 0.5)
        patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
        with torch.no_grad():
            logits = model(**inputs([sample])).logits[0, -1]
        assert [index[0].tolist() for index in patch.state.index_in] == kept
        torch.testing.assert_close(logits, ref, atol=2e-5, rtol=1e-5)
        patch.remove()


@family
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_alone(name, side):
    model = build(name)
    patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
    with torch.no_grad():
        batch = model(**inputs(["a", "b"], side)).logits
        for row, sample in enumerate(("a", "b")):
            alone = model(**inputs([sample])).logits[0, -1]
            torch.testing.assert_close(batch[row, -1], alone, atol=1e-5, rtol=1e-5)
        if side == "left":  # generate() left-pads: each sample's tokens as alone, revival included
            tokens = greedy(model, inputs(["a", "b"], "left"), steps=5)
            for row, sample in enumerate(("a", "b")):
                alone = greedy(model, inputs([sample]), steps=5)[0]
                assert tokens[row, -5:].tolist() == alone[-5:].tolist()
    patch.remove()


@family
def test_kept_positions_batch_invariant(name):
    model = build(name)
    patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
    with torch.no_grad():
        model(**inputs(["a", "b"], "left"))
        batch = [[(i[row][i[row] >= 0]).tolist() for i in patch.state.index_in] for row in range(2)]
        width = max(map(len, PROMPTS.values()))
        for row, sample in enumerate(("a", "b")):
            model(**inputs([sample]))
            pad = width - len(PROMPTS[sample])
            alone = [[p + pad for p in i[0].tolist()] for i in patch.state.index_in]
            assert [[p for p in layer if p >= pad] for layer in batch[row]] == alone  # layer 0 holds the padding
    patch.remove()


@family
def test_sdpa_equals_eager(name):
    outs = {}
    for attn in ("sdpa", "eager"):
        model = build(name, attn)
        patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
        with torch.no_grad():
            x = inputs(["a", "b"], "left")
            outs[attn] = (model(**x).logits[:, -1], [i.tolist() for i in patch.state.index_in], greedy(model, x, 5))
        patch.remove()
    torch.testing.assert_close(outs["sdpa"][0], outs["eager"][0], atol=1e-5, rtol=1e-5)
    assert outs["sdpa"][1] == outs["eager"][1]
    assert torch.equal(outs["sdpa"][2], outs["eager"][2])


@family
def test_compact_cache_after_prefill(name):
    model = build(name)
    patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
    with torch.no_grad():
        out = model(**inputs(["a"]), use_cache=True)
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [entry.tokens_in for entry in patch.state.log]
    n = len(PROMPTS["a"]) - 1
    assert lengths == [n + 1, count(0.5, n) + 1, count(0.5, n) + 1, count(0.25, n) + 1]
    patch.remove()


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_what_is_valid():
    model = build("llama")
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        tokenprune.apply(model, "lazyllm", layers=(1, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        tokenprune.apply(model, "lazyllm", layers=(2, 1))
    with pytest.raises(ValueError, match="keep or flops"):
        tokenprune.apply(model, "lazyllm", keep=0.5, flops=0.5)
    with pytest.raises(TypeError, match="'llm' model.*lazyllm"):
        tokenprune.apply(model, "fastv")
    patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
    with pytest.raises(NotImplementedError, match="labels"):
        model(**inputs(["a"]), labels=inputs(["a"])["input_ids"])
    with torch.no_grad(), tokenprune.disabled(model):
        model(**inputs(["a"]), labels=inputs(["a"])["input_ids"])
    patch.remove()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        tokenprune.apply(model, "lazyllm")


def test_flops_budget_and_table():
    model = build("qwen2")
    patch = tokenprune.apply(model, "lazyllm", layers=(0, 1, 2), flops=0.6)
    with torch.no_grad():
        model(**inputs(["a"]))
    adapter, state = patch.adapter, patch.state
    n = len(PROMPTS["a"])
    full = adapter.prefill_flops(n)
    table = adapter.flops_for(state)
    layers = sum(row["flops"] for row in table["layers"])
    assert abs(layers / full - 0.6) < 0.05
    assert [row["tokens_in"] for row in table["layers"]] == [e.tokens_in for e in state.log]
    patch.remove()


def test_refusals_and_other_call_forms():
    model = build("qwen2")
    patch = tokenprune.apply(model, "lazyllm", **OPTIONS)
    x = inputs(["a"])
    with torch.no_grad():
        with pytest.raises(TypeError, match="keyword arguments"):
            model.model(x["input_ids"])
        length = x["input_ids"].shape[1]
        four_d = torch.ones(1, 1, length, length, dtype=torch.bool).tril()
        with pytest.raises(NotImplementedError, match="4D attention mask"):
            model(**x, attention_mask=four_d)
        logits = model(**x).logits[:, -1]
        embeds = model.model.embed_tokens(x["input_ids"])
        torch.testing.assert_close(model(inputs_embeds=embeds).logits[:, -1], logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(**x, use_cache=False).logits[:, -1], logits, atol=1e-6, rtol=0)
    patch.remove()
    sliding = build("qwen2")
    sliding.config.layer_types = ["sliding_attention"] * 4
    with pytest.raises(NotImplementedError, match="sliding-window"):
        tokenprune.apply(sliding, "lazyllm")

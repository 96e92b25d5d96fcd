"""Qwen3.5 (hybrid gated delta-net / full attention) against Hugging Face's own layers, on a tiny random model.

Layers: linear, full, full, linear (``layer_types``), so every reduction point of the VLM examples is a
full-attention layer and both kinds of layer run after it.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import (
    PAD,
    build_qwen3_5,
    families,
    qwen3_samples,
)
from tests.vlm_checks import assert_batched_generate_equals_alone

TYPES = ("linear_attention", "full_attention", "full_attention", "linear_attention")
SAMPLES = qwen3_samples()
STEPS = 4


def build(attn: str = "sdpa", types: tuple[str, ...] = TYPES) -> torch.nn.Module:
    return build_qwen3_5(attn, types)


#: The matrix case's inputs (Qwen3-VL's prompts, Qwen2-VL's media); its model has other layer types.
inputs = families()["qwen3.5"].inputs


def greedy(model: torch.nn.Module, x: dict, **kwargs) -> torch.Tensor:
    return model.generate(**x, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD, **kwargs)


#: Pre-LLM merging, in-LLM pruning scored at full-attention layer 1 (and 2: aim), both.
REDUCING = [
    ("divprune", {"keep": 0.25}),
    ("random_pre_llm", {"keep": 0.5}),
    ("fastv", {"k": 2, "keep": 0.5}),
    ("aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75, "merge_positions": "original"}),
    ("aim", {"merge_keep": 1.0, "prune_start": 0.25, "prune_end": 0.75}),
    ("visionzip", {"keep": 0.5, "contextual": 0.25}),  # tower signals: Qwen3-VL's tower, read as Qwen2-VL's
    ("vispruner", {"keep": 0.5}),
]
IDENTITY = [("fastv", {"k": 2, "keep": 1.0}), ("aim", {"merge_keep": 1.0, "prune_start": 1.0, "prune_end": 1.0})]
BATCHES = [("a", "b"), ("b", "a", "video"), ("a", "text")]


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.mark.parametrize(("method", "options"), IDENTITY)
def test_zero_reduction_is_bit_exact(model, method, options):
    x = inputs(["a", "b"])
    with torch.no_grad():
        ref, ref_tokens = model(**x).logits, greedy(model, x)
        patch = tokenprune.apply(model, method, **options)
        try:
            out, tokens = model(**x).logits, greedy(model, x)
        finally:
            patch.remove()
    assert torch.equal(out, ref) and torch.equal(tokens, ref_tokens)


def hf_tail(model: torch.nn.Module, x: dict, after: int, index: torch.Tensor) -> torch.Tensor:
    """Logits of HF's own layers ``after + 1 ..`` run (unpatched, one sample) on the input positions ``index``.

    HF runs layers ``0 .. after`` on the whole prompt; then only the rows ``index`` go on, with their own rotary
    embeddings, no mask (causal, nothing padded) and no cache: the linear layers' recurrences start on them.
    """
    lm = model.model.language_model
    seen = {}
    handle = lm.rotary_emb.register_forward_hook(lambda m, a, out: seen.setdefault("rope", out))
    try:
        with torch.no_grad():
            hidden = model(**x, output_hidden_states=True, use_cache=False).hidden_states[after + 1]
            h = hidden[:, index]
            rope = tuple(t[:, index] for t in seen["rope"])
            for layer in lm.layers[after + 1 :]:
                h = layer(h, position_embeddings=rope, attention_mask=None)
            return model.lm_head(lm.norm(h))
    finally:
        handle.remove()


def test_in_llm_removal_equals_hf_layers_on_the_kept_tokens(model):
    """fastv after full layer 1: layers 2 (full) and 3 (linear) compute on the kept tokens only."""
    x = inputs(["a"])
    patch = tokenprune.apply(model, "fastv", k=2, keep=0.5)
    try:
        with torch.no_grad():
            out = model(**x)
        index = patch.state.index[0]
    finally:
        patch.remove()
    assert patch.state.tokens_per_layer()[1][1] == index.numel() < len(SAMPLES["a"])
    torch.testing.assert_close(out.logits, hf_tail(model, x, 1, index), rtol=0, atol=1e-5)


def test_cache_holds_kept_tokens_and_recurrent_states(model):
    x = inputs(["a", "b"])
    patch = tokenprune.apply(model, "fastv", k=2, keep=0.5)
    try:
        with torch.no_grad():
            out = model(**x)
        lengths = [n for n, _ in patch.state.tokens_per_layer()]
    finally:
        patch.remove()
    layers = out.cache.layers
    assert [type(layer).__name__ for layer in layers] == [
        "LinearAttentionLayer",
        "DynamicLayer",
        "DynamicLayer",
        "LinearAttentionLayer",
    ]
    assert [layers[i].keys.shape[-2] for i in (1, 2)] == [lengths[1], lengths[2]] and lengths[2] < lengths[1]
    assert all(layers[i].recurrent_states[0] is not None for i in (0, 3))


#: HF's chunked delta rule runs in float32 whatever the model's dtype, over chunks that fill slots shift: HF's own
#: unpatched left-padded batch differs from each sample alone by up to 8e-6 on this model, so 5e-5 here.
ATOL = 5e-5


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("method", "options"), REDUCING)
def test_padded_batch_equals_samples_run_alone(model, method, options, side):
    """Each sample's kept rows of a padded batch == it alone: fill slots leave conv and recurrent states alone."""
    patch = tokenprune.apply(model, method, **options)
    try:
        for names in BATCHES:
            with torch.no_grad():
                batched = model(**inputs(list(names), side)).logits
                state = patch.state
                assert state.reduced
                width = max(len(SAMPLES[n]) for n in names)
                for b, name in enumerate(names):
                    alone = model(**inputs([name])).logits[0]
                    valid = state.valid[b]
                    assert int(valid.sum()) == alone.shape[0] == patch.state.num_tokens
                    if method == "random_pre_llm":  # other draws in a batch: counts only
                        continue
                    offset = width - len(SAMPLES[name]) if side == "left" else 0
                    assert [i - offset for i in state.index[b][valid].tolist()] == patch.state.index[0].tolist()
                    torch.testing.assert_close(batched[b][valid], alone, rtol=0, atol=ATOL)
    finally:
        patch.remove()


@pytest.mark.parametrize(("method", "options"), [r for r in REDUCING if r[0] != "random_pre_llm"])
def test_batched_generate_equals_samples_alone(model, method, options):
    patch = tokenprune.apply(model, method, **options)
    try:
        for names in BATCHES:
            lengths = [len(SAMPLES[n]) for n in names]
            assert_batched_generate_equals_alone(
                model, greedy, inputs(list(names)), [inputs([n]) for n in names], lengths
            )
            if names[-1] != "text":  # the last call alone was a visual prompt: decoded on a compact cache
                assert patch.state.generated == STEPS - 1
    finally:
        patch.remove()


@pytest.mark.parametrize(("method", "options"), [(None, {}), *REDUCING[:4]])
def test_analytic_flops_equal_the_flop_counter(model, method, options):
    """Linear layers: projections, depthwise conv, chunked delta-rule matmuls; full layers as every family."""
    patch = tokenprune.apply(model, method, **options) if method else None
    try:
        for name in ("a", "mixed"):
            report = tokenprune.count_flops(model, inputs([name]))
            assert report.analytic == pytest.approx(report.measured, rel=1e-9)
    finally:
        if patch is not None:
            patch.remove()


def test_sdpa_and_eager_agree():
    results = []
    for attn in ("sdpa", "eager"):
        model = build(attn)
        tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=0.25, prune_end=0.75, merge_positions="original")
        with torch.no_grad():
            results.append(model(**inputs(["a", "b"])).logits)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


def test_removal_after_a_linear_attention_layer_is_refused(model):
    with pytest.raises(NotImplementedError, match="linear-attention .* layer: it has no softmax queries"):
        tokenprune.apply(model, "fastv", k=1, keep=0.5)  # scored at layer 0, a linear layer
    other = build(types=("full_attention", "linear_attention", "full_attention", "linear_attention"))
    with pytest.raises(NotImplementedError, match=r"after layer 1 .*layers \[0, 2\]"):
        tokenprune.apply(other, "fastv", k=2, keep=0.5)
    patch = tokenprune.apply(other, "fastv", k=1, keep=0.5)  # scored at layer 0, full attention: fine
    with torch.no_grad():
        other(**inputs(["a"]))
    assert patch.state.reduced
    patch.remove()


def test_flops_budget_scored_at_a_linear_layer_is_refused_at_the_prefill():
    other = build(types=("full_attention", "linear_attention", "full_attention", "linear_attention"))
    tokenprune.apply(other, "fastv", flops=0.8)
    with pytest.raises(NotImplementedError, match="linear-attention"), torch.no_grad():
        other(**inputs(["a"]))

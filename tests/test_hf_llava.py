"""LLaVA (transformers 5.x) with ``fastv`` and ``aim``: visual tokens removed for real inside the LLM.

Tiny random-weight models built from configs (CLIP 32px / patch 8 -> 16 visual tokens per image; Llama or
Qwen2 text model, hidden 64, 4 layers, GQA 4/2 heads, vocab 200): nothing is downloaded.

What every method has on every family (zero reduction bit-exact, remove() exact, lengths following the state,
batches, generate, sdpa == eager, FLOPs) is in test_vlm_matrix; here, what is LLaVA's or one method's: exact
per-layer counts, embeddings and cache-less calls, and the removal against an independent reference: the
unpatched HF layers run by hand on the kept tokens with their original positions (and, for FastV's selection,
HF's own eager attention maps), prefill and every decode step of ``generate()``. Tolerances: bit-exact where
nothing is reduced; 1e-5 (float32) for reference / batch-vs-single / decode comparisons.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as hf
from timm.models.vision_transformer import VisionTransformer

import tokenprune
from tests.helpers.vlm_families import build_llava as build
from tests.helpers.vlm_families import llava_pixels as pixels
from tests.helpers.vlm_families import llava_prompt as prompt
from tests.helpers.vlm_families import padded
from tokenprune.measure.flops import measure_flops

IMAGE, TOKENS, IMG_ID, PAD = 32, 16, 199, 0
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75},
}
# Visual tokens entering each of the 4 layers and LLM sequence lengths for one 16-token image + 7 text tokens.
EXPECTED_VISUAL = {"fastv": [16, 16, 8, 8], "aim": [8, 8, 4, 0]}
EXPECTED_TOKENS = {"fastv": [23, 23, 15, 15], "aim": [15, 15, 11, 7]}


PROMPTS = [prompt([1, 5, 6], [7, 8, 9, 10]), prompt([1, 11], [12, 13, 14, 15, 16, 17])]


def batch(prompts: list[list[int]], side: str = "left") -> dict:
    """Padded ``input_ids``/``attention_mask`` and generate-style ``position_ids`` for a list of prompts."""
    ids, mask = padded(prompts, side)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def single(p: list[int]) -> dict:
    return {"input_ids": torch.tensor([p])}


def greedy(model, inputs: dict, steps: int = 5, **kwargs):
    inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, **kwargs)


# ----------------------------------------------------------------------------- exactness first
# ----------------------------------------------------------------------------- the schedule, for real
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_sequence_and_cache_lengths_follow_the_schedule(method):
    """The exact counts of each method's schedule (that caches and positions follow the state: test_vlm_matrix)."""
    model = build()
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        out = model(**inputs)
    state = patch.state
    lengths = EXPECTED_TOKENS[method]
    assert state.visual_per_layer() == [[v] for v in EXPECTED_VISUAL[method]]
    assert [tokens_in for tokens_in, _ in state.tokens_per_layer()] == lengths
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == lengths  # each layer caches what it saw
    steps = 6
    with torch.no_grad():
        out = greedy(model, inputs, steps, return_dict_in_generate=True)
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [n + steps - 1 for n in EXPECTED_TOKENS[method]]


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_inputs_embeds_and_no_cache_calls_reduce_the_same(method):
    """Visual spans are found from embeddings too; a forward without a cache removes the same tokens."""
    model = build()
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        expected = model(**inputs).logits
        index = patch.state.index
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
        assert torch.equal(patch.state.index, index)
        uncached = model(**inputs, use_cache=False)
        assert uncached.cache is None and torch.equal(patch.state.index, index)
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # one entry per layer, shrinking
    torch.testing.assert_close(from_embeds, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncached.logits, expected, rtol=0, atol=1e-6)
    assert hidden[-1].shape[1] == expected.shape[1] < hidden[0].shape[1]


# ----------------------------------------------------------------------------- against an independent reference
def _llm_inputs(model, run) -> dict:
    """The kwargs the text model received during ``run()`` (after tokenprune's entry hook, if patched)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs.get("position_ids"))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen


def _by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
    """The original HF layers run on ``slots[l]`` (indices into ``embeds``) at layer ``l``, positions kept."""
    lm = model.model.language_model
    hidden, current = embeds, torch.arange(embeds.shape[1])
    with torch.no_grad():
        for layer, block in enumerate(lm.layers):
            block = getattr(block, "base_layer", block)
            hidden = hidden[:, torch.searchsorted(current, slots[layer])]
            current = slots[layer]
            pos = positions[:, current]
            n = len(current)
            causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = block(
                hidden, attention_mask=causal, position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos
            )
        return model.lm_head(lm.norm(hidden))


def test_fastv_keeps_the_tokens_hf_eager_attention_ranks_highest():
    model = build(attn="eager")
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[1][0].mean(dim=0)[-1]  # layer k-1, last row
    visual = (inputs["input_ids"][0] == IMG_ID).nonzero().squeeze(1)
    expected = visual[attention[visual].topk(TOKENS // 2).indices].sort().values
    model.set_attn_implementation("sdpa")
    patch = tokenprune.apply(model, "fastv", k=2, keep=0.5)
    with torch.no_grad():
        model(**inputs)
    kept = patch.state.index_in[2][0]
    assert torch.equal(kept[torch.isin(kept, visual)], expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "method, options",
    [
        ("fastv", {"k": 2, "keep": 0.5}),
        ("fastv", {"k": 1, "keep": 0.25}),
        ("aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75}),
        ("aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75, "merge_positions": "original"}),
        ("aim", {"merge_keep": 1.0, "prune_start": 0.5, "prune_end": 0.5}),
    ],
)
def test_prefill_and_every_decode_step_match_the_reference(method, options, attn):
    """Prefill logits and each decode step's logits == the unpatched layers run by hand on the kept tokens.

    Decode steps check the compact KV cache, its masks and the rotary positions of new tokens (the caller's
    positions, minus what merging compacted away).
    """
    model = build("qwen2" if method == "aim" else "llama", attn)
    inputs = dict(single(PROMPTS[1]), pixel_values=pixels(1))
    patch = tokenprune.apply(model, method, **options)
    seen = _llm_inputs(model, lambda: model(**inputs))
    with torch.no_grad():
        prefill = model(**inputs).logits
    state = patch.state
    embeds, positions = seen["embeds"], seen["positions"]
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    slots = [torch.searchsorted(state.index_in[0][0], index[0]) for index in state.index_in]
    torch.testing.assert_close(_by_hand(model, embeds, positions, slots), prefill, rtol=0, atol=1e-5)

    steps = 4
    with torch.no_grad():
        out = greedy(model, inputs, steps, return_dict_in_generate=True, output_logits=True)
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    lm = model.model.language_model
    for step in range(steps):
        grown = torch.cat([embeds, lm.embed_tokens(new[:step])[None]], dim=1)
        grown_positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(step)[None]], dim=1)
        extra = torch.arange(embeds.shape[1], embeds.shape[1] + step)
        reference = _by_hand(model, grown, grown_positions, [torch.cat([s, extra]) for s in slots])
        torch.testing.assert_close(reference[0, -1], out.logits[step][0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- batches
def _rows_per_sample(logits: torch.Tensor, state, b: int, offset: int) -> tuple[torch.Tensor, list[int]]:
    valid = state.valid[b]
    return logits[b][valid], [i - offset for i in state.index[b][valid].tolist()]


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_samples_with_different_image_counts(method):
    """Different visual counts per sample: shorter samples are left-filled with masked slots."""
    model = build()
    prompts = [prompt([1, 5], [7, 8, 9], images=2), prompt([1, 5, 6, 4], [7, 8])]
    images = pixels(3)
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        batched = model(**batch(prompts), pixel_values=images).logits
        state = patch.state
        counts = state.visual_per_layer()
        width = max(map(len, prompts))
        firsts = [images[:2], images[2:]]
        for b, p in enumerate(prompts):
            alone = model(**single(p), pixel_values=firsts[b]).logits[0]
            assert [c[0] for c in patch.state.visual_per_layer()] == [c[b] for c in counts]
            rows, index = _rows_per_sample(batched, state, b, width - len(p))
            assert index == patch.state.index[0].tolist()
            torch.testing.assert_close(rows, alone, rtol=0, atol=1e-5)
    assert counts[0] == ([32, 16] if method == "fastv" else [16, 8])  # two images vs one
    if method == "aim":  # each image is merged on its own (never across images): 2 x 8 tokens holding 16
        patch.remove()
        patch = tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=1.0, prune_end=1.0)
        with torch.no_grad():
            model(**batch(prompts), pixel_values=images)
        state = patch.state
        sizes = state.size[0][state.visual[0]]
        first_image = state.index[0][state.visual[0]] < prompts[0].index(3) + (width - len(prompts[0]))
        assert first_image.sum() == 8 and len(sizes) == 16
        assert sizes[first_image].sum() == sizes[~first_image].sum() == TOKENS


# ----------------------------------------------------------------------------- FLOPs budgets
@pytest.mark.parametrize("method, budget", [("aim", 0.5)])  # 0.75 for every method: test_vlm_matrix
def test_flops_budget_is_a_fraction_of_llm_prefill(method, budget):
    model = build()
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    patch = tokenprune.apply(model, method, flops=budget)
    assert patch.schedule is None  # solved per prompt
    with torch.no_grad():
        model(**inputs)
    adapter, state = patch.adapter, patch.state

    def llm(table):
        return sum(row["flops"] for row in table["layers"])

    full = llm(adapter.analytic_flops(len(PROMPTS[0]), [0] * 4))
    # One visual token more or less moves the cost by ~1/23 of a layer: the closest reachable budget.
    assert abs(llm(adapter.flops_for(state)) / full - budget) < 0.03
    assert state.reduced


@pytest.mark.parametrize("method, options", [("aim", {"merge_keep": 0.3})])  # the examples: test_vlm_matrix
def test_analytic_flops_equal_the_flop_counter(method, options):
    """Vision tower + projector + merging + every LLM layer (+ scoring) + LM head, as torch counts them."""
    model = build()
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    unpatched = measure_flops(model, **inputs)
    assert tokenprune.apply(model, "fastv", keep=1.0).adapter.analytic_flops(len(PROMPTS[0]), [0] * 4)[
        "total"
    ] == pytest.approx(unpatched, rel=1e-12)
    model._tokenprune_patch.remove()
    patch = tokenprune.apply(model, method, **options)
    measured = measure_flops(model, **inputs)
    table = patch.adapter.flops_for(patch.state)
    assert table["total"] == pytest.approx(measured, rel=1e-12) and measured < unpatched
    assert [row["tokens_in"] for row in table["layers"]] == [n for n, _ in patch.state.tokens_per_layer()]


def test_unreachable_flops_budget_names_the_valid_range():
    model = build()
    tokenprune.apply(model, "fastv", k=2, flops=0.3)  # k=2 of 4 layers always see all 16 visual tokens
    with pytest.raises(ValueError, match=r"valid budgets are in \[0\.6"), torch.no_grad():
        model(**single(PROMPTS[0]), pixel_values=pixels(1))


def test_analytic_flops_count_vision_tower_projector_and_llm():
    model = build()
    adapter = tokenprune.apply(model, "fastv", keep=1.0).adapter
    table = adapter.analytic_flops(len(PROMPTS[0]), [0] * 4)
    assert table["embed"] > 0 and table["head"] == 2.0 * len(PROMPTS[0]) * 64 * 200
    assert table["total"] == pytest.approx(table["embed"] + table["head"] + sum(r["flops"] for r in table["layers"]))
    assert adapter.num_tokens() == TOKENS


# ----------------------------------------------------------------------------- errors
def test_other_attention_implementations_are_refused():
    model = build()
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="sdpa"):
        tokenprune.apply(model, "fastv")
    model = build()
    tokenprune.apply(model, "fastv")
    model.model.language_model.config._attn_implementation = "flex_attention"  # switched after apply
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"), torch.no_grad():
        model(**single(PROMPTS[0]), pixel_values=pixels(1))


def test_unsupported_models_and_methods_raise_with_the_supported_ones():
    text_only = hf.LlamaForCausalLM(
        hf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        tokenprune.apply(text_only, "fastv")
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(TypeError, match="vision-language"):
        tokenprune.apply(vit, "aim")
    with pytest.raises(TypeError, match=re.escape(str(tokenprune.methods(kind="vlm")))):
        tokenprune.apply(build(), "evit", r=2)


def test_config_errors():
    model = build()
    with pytest.raises(TypeError, match="valid"):
        tokenprune.apply(model, "fastv", r=3)
    with pytest.raises(ValueError, match="either keep or flops"):
        tokenprune.apply(model, "fastv", keep=0.5, flops=0.5)
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        tokenprune.apply(model, "fastv", k=4)
    with pytest.raises(ValueError, match="prune_end"):
        tokenprune.apply(model, "aim", prune_start=0.8, prune_end=0.5)
    with pytest.raises(ValueError, match="merge_keep"):
        tokenprune.apply(model, "aim", merge_keep=0.0)
    assert not hasattr(model, "_tokenprune_patch")


def test_labels_are_refused_while_reducing():
    model = build()
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])
    with tokenprune.disabled(model), torch.no_grad():
        assert model(**inputs, labels=inputs["input_ids"]).loss is not None


def test_static_cache_is_refused():
    model = build()
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="DynamicCache"), torch.no_grad():
        greedy(model, dict(single(PROMPTS[0]), pixel_values=pixels(1)), 2, cache_implementation="static")

"""Idefics3 / SmolVLM (transformers 5.x) with ``fastv``, ``aim`` and ``none``: visual tokens removed for real.

Tiny random-weight models built from configs (vision tower 32px / patch 4 -> 64 patches, pixel shuffle x2 ->
16 ``<image>`` tokens per sub-image; Llama text model, hidden 64, 4 layers, GQA 4/2 heads, vocab 200): nothing is
downloaded. Prompts are written as the processor writes them: a split image is its tiles, each after
``<fake_token_around_image><row_i_col_j>``, then the global view after ``<fake_token_around_image><global-img>``.

What every method has on every family (zero reduction, remove(), lengths following the state, batches,
generate, sdpa == eager, FLOPs == counter) is in test_vlm_matrix; here, sub-image spans, per-sub-image merging
and each method's exact counts.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import IDEFICS_SPLIT, IDEFICS_WHOLE, families
from tests.helpers.vlm_families import idefics_pixels as pixels

IMG_ID, PAD, SIDE, TOKENS = 199, 0, 32, 16
FAKE, GLOBAL, ROW1_COL1, ROW1_COL2, NEWLINE = 190, 191, 180, 181, 10
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75},
}
# A 1 x 2 split image + its global view (3 sub-images, 48 visual tokens) between 14 text tokens; an image that
# is not split: the global view only.
SPLIT, WHOLE = IDEFICS_SPLIT, IDEFICS_WHOLE
PROMPTS, SUB_IMAGES = [SPLIT, WHOLE], [3, 1]
EXPECTED_VISUAL = {"fastv": [48, 48, 24, 24], "aim": [24, 24, 12, 0]}  # AIM merges each sub-image 16 -> 8
EXPECTED_TOKENS = {"fastv": [62, 62, 38, 38], "aim": [38, 38, 26, 14]}


def build(family: str = "idefics3", attn: str = "sdpa"):
    """A fresh eval-mode tiny Idefics3 or SmolVLM (the same weights every call)."""
    return families()[family].build(attn)


def single(b: int) -> dict:
    return {"input_ids": torch.tensor([PROMPTS[b]]), "pixel_values": pixels()[b : b + 1, : SUB_IMAGES[b]]}


def batch(side: str = "left") -> dict:
    return families()["idefics3"].inputs(["a", "b"], side)


# ----------------------------------------------------------------------------- the schedule, for real
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_sequence_and_cache_lengths_follow_the_schedule(method):
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        out = model(**single(0))
    state = patch.state
    lengths = EXPECTED_TOKENS[method]
    assert state.visual_per_layer() == [[v] for v in EXPECTED_VISUAL[method]]
    assert [tokens_in for tokens_in, _ in state.tokens_per_layer()] == lengths
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == lengths  # each layer caches what it saw
    assert out.logits.shape[1] == lengths[-1]
    # Row/col labels, <fake_token_around_image>, <global-img> and newlines are text: in every layer, in order.
    text = [i for i, t in enumerate(SPLIT) if t != IMG_ID]
    for index in state.index_in:
        index = index[0].tolist()
        assert index == sorted(index) and [i for i in index if SPLIT[i] != IMG_ID] == text
    assert state.spans == [[TOKENS] * 3]  # one span per sub-image
    assert state.rows == ([10] if method == "aim" else [1])  # AIM: every text token after the first <image>


def test_aim_merges_within_each_sub_image():
    model = build()
    patch = tokenprune.apply(model, "aim", merge_keep=0.25, prune_start=1.0, prune_end=1.0)
    with torch.no_grad():
        model(**single(0))
    state = patch.state
    index, size, visual = state.index[0], state.size[0], state.visual[0]
    starts = [i for i in range(len(SPLIT)) if SPLIT[i] == IMG_ID and SPLIT[i - 1] != IMG_ID]
    for start in starts:
        mine = visual & (index >= start) & (index < start + TOKENS)
        assert int(mine.sum()) == 4 and size[mine].sum() == TOKENS  # 16 -> 4 tokens holding this sub-image only


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_a_batch_has_each_samples_sub_image_spans(method, side):
    """A split image (3 sub-images) and a whole one (1) in one padded batch (rows == alone: test_vlm_matrix)."""
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        model(**batch(side))
    assert patch.state.spans == [[TOKENS] * 3, [TOKENS]]


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("family, method", [("idefics3", "fastv"), ("idefics3", "aim"), ("smolvlm", "aim")])
def test_count_flops_agrees_with_the_analytic_table(family, method):
    """Vision tower + connector per sub-image, merging, LLM layers (+ scoring), LM head, as torch counts them."""
    model = build(family)
    inputs = single(0)
    full = tokenprune.count_flops(model, inputs)
    assert full.analytic == pytest.approx(full.measured, rel=1e-9)
    patch = tokenprune.apply(model, method, **REDUCING[method])
    reduced = tokenprune.count_flops(model, inputs)
    assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9) and reduced.measured < full.measured
    assert full.embed == pytest.approx(3 * patch.adapter.vision_flops())  # three sub-images
    assert [row["tokens_in"] for row in reduced.layers] == EXPECTED_TOKENS[method]


# ----------------------------------------------------------------------------- errors
def test_other_attention_implementations_are_refused():
    model = build()
    model.model.text_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports \['sdpa', 'eager'\]"):
        tokenprune.apply(model, "fastv")
    model = build()
    tokenprune.apply(model, "fastv")
    model.model.text_model.config._attn_implementation = "flex_attention"  # switched after apply
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"), torch.no_grad():
        model(**single(0))


def test_unsupported_models_and_methods_raise_with_the_supported_ones():
    text_only = hf.MistralForCausalLM(  # a model no adapter takes (Llama/Qwen decoders are lazyllm's "llm" kind)
        hf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=9)
    )
    with pytest.raises(TypeError, match="Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration"):
        tokenprune.apply(text_only, "fastv")
    with pytest.raises(TypeError, match=re.escape(str(tokenprune.methods(kind="vlm")))):
        tokenprune.apply(build(), "evit", r=2)


def test_labels_are_refused_while_reducing():
    model = build()
    inputs = single(0)
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])

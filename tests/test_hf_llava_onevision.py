"""LLaVA-OneVision (transformers 5.x, anyres) with ``fastv``, ``aim`` and ``none``: visual tokens removed for real.

A tiny random-weight model built from a config (SigLIP 32px / patch 8 -> 16 tokens per crop; tiles from the
pinpoints 32x64, 64x32, 64x64; Qwen2 text model, hidden 64, 4 layers, GQA 4/2 heads, vocab 200): nothing is
downloaded. Image sizes pick the layouts: (40, 70) -> base 16 + 4 high-res rows of 8 + 4 newlines = 52
placeholders; (64, 64) -> 16 + 8 x (8 + 1) = 88; (30, 30) -> 16 + 4 x (4 + 1) = 36.

What every method has on every family (zero reduction, remove(), lengths following the state, batches,
generate, sdpa == eager, FLOPs == counter) is in test_vlm_matrix; here, the anyres layout, its structural
newlines, per-grid merging and each method's exact counts. Tolerances: bit-exact (``torch.equal``) where
nothing is reduced.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import families
from tests.helpers.vlm_families import ov_images as images

IMG_ID = 199
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75},
}
WIDE, SQUARE, SMALL = (40, 70), (64, 64), (30, 30)
PLACEHOLDERS = {WIDE: 52, SQUARE: 88, SMALL: 36}
NEWLINES = {WIDE: 4, SQUARE: 8, SMALL: 4}
# One WIDE image (48 visual + 4 newlines) between 3 and 3 text tokens: visual tokens entering each layer, and
# sequence lengths (text + newlines + visual). AIM merges base 16 -> 8 and high-res 32 -> 16.
EXPECTED_VISUAL = {"fastv": [48, 48, 24, 24], "aim": [24, 24, 12, 0]}
EXPECTED_TOKENS = {"fastv": [58, 58, 34, 34], "aim": [34, 34, 22, 10]}


def build(attn: str = "sdpa") -> hf.LlavaOnevisionForConditionalGeneration:
    """A fresh eval-mode tiny LLaVA-OneVision (the same weights every call)."""
    return families()["llava-onevision"].build(attn)


def prompt(before: list[int], after: list[int], size: tuple[int, int]) -> list[int]:
    return list(before) + [IMG_ID] * PLACEHOLDERS[size] + list(after)


PROMPTS = [prompt([1, 5, 6], [7, 8, 9], WIDE), prompt([1, 11], [12, 13, 14, 15, 16, 17], SQUARE)]
SIZES = [WIDE, SQUARE]


def single(b: int) -> dict:
    pictures = images(SIZES)
    return {
        "input_ids": torch.tensor([PROMPTS[b]]),
        "pixel_values": pictures["pixel_values"][b : b + 1],
        "image_sizes": pictures["image_sizes"][b : b + 1],
    }


# ----------------------------------------------------------------------------- the anyres layout
def test_layout_agrees_with_hf_features():
    model = build()
    adapter = tokenprune.apply(model, "fastv", keep=1.0).adapter
    sizes = [WIDE, SQUARE, SMALL]
    with torch.no_grad():
        features = model.model.get_image_features(**images(sizes)).pooler_output
    kinds, crops = adapter.image_layouts(torch.tensor(sizes))
    assert [len(f) for f in features] == [len(k) for k in kinds] == [PLACEHOLDERS[s] for s in sizes]
    assert [int((k == 2).sum()) for k in kinds] == [NEWLINES[s] for s in sizes]
    assert all(k[:16].eq(0).all() and k[-1] == 2 for k in kinds)  # base grid first, a newline last
    assert crops == [5, 5, 3] and adapter.num_tokens(SQUARE) == PLACEHOLDERS[SQUARE]
    # Several images in one prompt: base crops only, each followed by one newline (as HF).
    kinds, crops = adapter.image_layouts(torch.tensor([WIDE, SQUARE]), torch.tensor([2]))
    assert crops == [1, 1] and [k.tolist() for k in kinds] == [[0] * 16 + [2]] * 2


# ----------------------------------------------------------------------------- exactness first
# ----------------------------------------------------------------------------- the schedule, for real
def _newline_positions(p: list[int], size: tuple[int, int], offset: int = 0) -> list[int]:
    """Input positions of the newline placeholders of the one image in prompt ``p``."""
    start = p.index(IMG_ID) + offset
    model = build()
    kinds, _ = tokenprune.apply(model, "none").adapter.image_layouts(torch.tensor([size]))
    return [start + i for i in (kinds[0] == 2).nonzero().squeeze(1).tolist()]


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
    # Text and newline tokens are untouchable: all still there in the last layer, in order.
    protected = [i for i, t in enumerate(PROMPTS[0]) if t != IMG_ID] + _newline_positions(PROMPTS[0], WIDE)
    for index in state.index_in:
        index = index[0].tolist()
        assert index == sorted(index) and set(protected) <= set(index)
    assert state.spans == [[16, 32]]  # base grid, high-res grid (its 4 newlines excluded)
    assert state.rows == ([3] if method == "aim" else [1])  # AIM's query rows: the text after the image only


def test_aim_merges_within_each_grid_and_keeps_the_newlines():
    model = build()
    patch = tokenprune.apply(model, "aim", merge_keep=0.25, prune_start=1.0, prune_end=1.0)
    with torch.no_grad():
        model(**single(0))
    state = patch.state
    start = PROMPTS[0].index(IMG_ID)
    index, size, visual = state.index[0], state.size[0], state.visual[0]
    base = visual & (index < start + 16)
    high_res = visual & (index >= start + 16)
    assert int(base.sum()) == 4 and int(high_res.sum()) == 8  # 16 -> 4 and 32 -> 8, separately
    assert size[base].sum() == 16 and size[high_res].sum() == 32
    newlines = torch.isin(index, torch.tensor(_newline_positions(PROMPTS[0], WIDE)))
    assert int(newlines.sum()) == 4 and bool((size[newlines] == 1).all()) and not bool(visual[newlines].any())


# ----------------------------------------------------------------------------- batches
def test_several_images_in_one_prompt_are_base_grids_with_one_newline_each():
    model = build()
    ids = [1, 5] + [IMG_ID] * 17 + [3] + [IMG_ID] * 17 + [7, 8]
    inputs = {"input_ids": torch.tensor([ids]), **images([WIDE, SMALL]), "batch_num_images": torch.tensor([2])}
    patch = tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=0.5, prune_end=1.0)
    with torch.no_grad():
        model(**inputs)
    state = patch.state
    assert state.spans == [[16, 16]] and state.visual_per_layer()[0] == [16]
    assert int(state.structural.sum()) == 2
    table = patch.adapter.flops_for(state)
    assert table["embed"] - table["merge"] == pytest.approx(2 * patch.adapter.vision_flops())  # one crop each
    report = tokenprune.count_flops(model, inputs)
    assert report.analytic == pytest.approx(report.measured, rel=1e-9)


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_count_flops_agrees_with_the_analytic_table(method):
    """Vision tower + projector on every crop, merging, LLM layers (+ scoring), LM head, as torch counts them."""
    model = build()
    inputs = single(0)
    full = tokenprune.count_flops(model, inputs)
    assert full.analytic == pytest.approx(full.measured, rel=1e-9)
    patch = tokenprune.apply(model, method, **REDUCING[method])
    reduced = tokenprune.count_flops(model, inputs)
    assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9) and reduced.measured < full.measured
    assert reduced.embed >= 5 * patch.adapter.vision_flops()  # 5 crops of the WIDE image
    assert [row["tokens_in"] for row in reduced.layers] == EXPECTED_TOKENS[method]


# ----------------------------------------------------------------------------- errors
def test_other_attention_implementations_are_refused():
    model = build()
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports \['sdpa', 'eager'\]"):
        tokenprune.apply(model, "fastv")


def test_unsupported_models_and_methods_raise_with_the_supported_ones():
    text_only = hf.MistralForCausalLM(  # a model no adapter takes (Llama/Qwen decoders are lazyllm's "llm" kind)
        hf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=9)
    )
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration") as error:
        tokenprune.apply(text_only, "fastv")
    assert "Idefics3ForConditionalGeneration" in str(error.value)
    with pytest.raises(TypeError, match=re.escape(str(tokenprune.methods(kind="vlm")))):
        tokenprune.apply(build(), "evit", r=2)

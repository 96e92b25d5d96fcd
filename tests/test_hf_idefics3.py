"""Idefics3 / SmolVLM (transformers 5.x) with ``fastv``, ``aim`` and ``none``: visual tokens removed for real.

Tiny random-weight models built from configs (vision tower 32px / patch 4 -> 64 patches, pixel shuffle x2 ->
16 ``<image>`` tokens per sub-image; Llama text model, hidden 64, 4 layers, GQA 4/2 heads, vocab 200): nothing is
downloaded. Prompts are written as the processor writes them: a split image is its tiles, each after
``<fake_token_around_image><row_i_col_j>``, then the global view after ``<fake_token_around_image><global-img>``.

Tolerances: bit-exact (``torch.equal``) where nothing is reduced and after ``remove()``; 1e-5 (float32) for
batch-vs-single and SDPA-vs-eager comparisons.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers as hf

import tokenprune
from tests.vlm_checks import (
    assert_batch_rows_equal_alone,
    assert_batched_generate_equals_alone,
    assert_remove_restores,
    assert_zero_reduction_exact,
)

IMG_ID, PAD, SIDE, TOKENS = 199, 0, 32, 16
FAKE, GLOBAL, ROW1_COL1, ROW1_COL2, NEWLINE = 190, 191, 180, 181, 10
ZERO = {
    "fastv": {"keep": 1.0},
    "aim": {"merge_keep": 1.0, "prune_start": 1.0, "prune_end": 1.0},
    "none": {},
}
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75},
}
IMAGE = [IMG_ID] * TOKENS
# A 1 x 2 split image + its global view (3 sub-images, 48 visual tokens) between 14 text tokens.
SPLIT = [1, 5, FAKE, ROW1_COL1, *IMAGE, FAKE, ROW1_COL2, *IMAGE, NEWLINE, NEWLINE, FAKE, GLOBAL, *IMAGE, FAKE, 7, 8, 9]
# An image that is not split: the global view only.
WHOLE = [1, 11, FAKE, GLOBAL, *IMAGE, FAKE, 12, 13, 14, 15, 16, 17]
PROMPTS, SUB_IMAGES = [SPLIT, WHOLE], [3, 1]
EXPECTED_VISUAL = {"fastv": [48, 48, 24, 24], "aim": [24, 24, 12, 0]}  # AIM merges each sub-image 16 -> 8
EXPECTED_TOKENS = {"fastv": [62, 62, 38, 38], "aim": [38, 38, 26, 14]}
_BUILT: dict[tuple[str, str], torch.nn.Module] = {}


def build(family: str = "idefics3", attn: str = "sdpa"):
    """A fresh eval-mode tiny Idefics3 or SmolVLM (the same weights every call)."""
    if (family, attn) not in _BUILT:
        torch.manual_seed(0)
        vision_cls, config_cls, model_cls = {
            "idefics3": (hf.Idefics3VisionConfig, hf.Idefics3Config, hf.Idefics3ForConditionalGeneration),
            "smolvlm": (hf.SmolVLMVisionConfig, hf.SmolVLMConfig, hf.SmolVLMForConditionalGeneration),
        }[family]
        vision = vision_cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=SIDE,
            patch_size=4,
        )
        # A larger init than the default makes attention peaky, so token rankings are far from ties.
        text = hf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=200,
            max_position_embeddings=512,
            initializer_range=0.1,
            pad_token_id=PAD,
        )
        config = config_cls(vision_config=vision, text_config=text, image_token_id=IMG_ID, scale_factor=2)
        model = model_cls(config).eval()
        model.set_attn_implementation(attn)
        _BUILT[family, attn] = model
    return copy.deepcopy(_BUILT[family, attn])


def pixels(seed: int = 1) -> torch.Tensor:
    """``(2, 3, 3, 32, 32)``: prompt 0's three sub-images, prompt 1's one (then all-zero padding, as HF pads)."""
    values = torch.randn(2, 3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    values[1, 1:] = 0
    return values


def single(b: int) -> dict:
    return {"input_ids": torch.tensor([PROMPTS[b]]), "pixel_values": pixels()[b : b + 1, : SUB_IMAGES[b]]}


def batch(side: str = "left") -> dict:
    width = max(map(len, PROMPTS))
    ids, mask = [], []
    for p in PROMPTS:
        pad = [PAD] * (width - len(p))
        ids.append(pad + p if side == "left" else p + pad)
        mask.append([0] * len(pad) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(pad))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "pixel_values": pixels()}


def greedy(model, inputs: dict, steps: int = 3, **kwargs):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=PAD, **kwargs)


# ----------------------------------------------------------------------------- exactness first
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("method", ["fastv", "aim", "none"])
def test_zero_reduction_is_bit_exact(method, family):
    model = build(family)
    inputs = single(0)
    patch = assert_zero_reduction_exact(model, inputs, method, ZERO[method], greedy)
    length = len(SPLIT)
    assert patch.state.tokens_per_layer() == [(length, length)] * 4
    assert patch.schedule == [1.0] * 4


@pytest.mark.parametrize("method", ["fastv", "aim", "none"])
def test_remove_restores_modules_and_outputs(method):
    assert_remove_restores(build(), single(0), method, REDUCING.get(method, {}), greedy)


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


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_generate_continues_on_the_compact_cache(method):
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    steps = 4
    with torch.no_grad():
        out = greedy(model, single(0), steps, return_dict_in_generate=True)
    assert out.sequences.shape[1] == len(SPLIT) + steps
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [n + steps - 1 for n in EXPECTED_TOKENS[method]]
    assert patch.state.generated == steps - 1


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_padded_batch_equals_samples_run_alone(method, side):
    """A split image (3 sub-images) and a whole one (1) in one padded batch == each prompt alone."""
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        batched = model(**batch(side)).logits
        state = patch.state
        assert state.spans == [[TOKENS] * 3, [TOKENS]]
    lengths = [len(p) for p in PROMPTS]
    assert_batch_rows_equal_alone(model, patch, batched, state, [single(b) for b in range(2)], lengths, side)


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_batched_generate_equals_samples_alone(method):
    model = build()
    tokenprune.apply(model, method, **REDUCING[method])
    singles, lengths = [single(b) for b in range(2)], [len(p) for p in PROMPTS]
    assert_batched_generate_equals_alone(model, greedy, batch("left"), singles, lengths)


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_sdpa_and_eager_agree(method):
    results = []
    for attn in ("sdpa", "eager"):
        model = build(attn=attn)
        patch = tokenprune.apply(model, method, **REDUCING[method])
        with torch.no_grad():
            results.append((model(**single(0)).logits, patch.state.index))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    assert torch.equal(results[0][1], results[1][1])


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
    text_only = hf.LlamaForCausalLM(
        hf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(TypeError, match="Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration"):
        tokenprune.apply(text_only, "fastv")
    with pytest.raises(TypeError, match=re.escape(str(tokenprune.methods(kind="vlm")))):
        tokenprune.apply(build(), "tome", r=2)


def test_labels_are_refused_while_reducing():
    model = build()
    inputs = single(0)
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])

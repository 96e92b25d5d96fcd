"""``pyramiddrop``: per-stage visual counts, the ranking against HF's own eager attention, FLOPs budgets, errors.

What every method has on every family (exactness, remove(), batches, generate, sdpa == eager, FLOPs == counter)
is in test_vlm_matrix. Here, on the tiny LLaVA (16 visual tokens per image, 4 layers; Qwen2-VL for 3-axis
positions): the exact count each stage holds, and that each boundary keeps the visual tokens the last prompt
token attends to most in the layer that ends the stage, read from HF's eager attention weights (a forward hook
on each layer's attention, not tokenprune's scoring), including after earlier stages removed tokens.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import LLAVA_ID, build_llava, families, llava_pixels, llava_prompt, padded
from tokenprune.methods.vlm import count

PROMPT = llava_prompt([1, 5, 6], [7, 8, 9, 10])  # 16 visual tokens, 7 text
TWO_IMAGES = llava_prompt([1, 11], [12, 13, 14], images=2)  # 32 visual tokens


def run(model, prompts: list[list[int]], images: int, method: str = "pyramiddrop", **options):
    """Apply ``method`` and run ``prompts`` (one, unpadded; several: left-padded); returns the patch."""
    patch = tokenprune.apply(model, method, **options)
    if len(prompts) == 1:
        inputs = {"input_ids": torch.tensor(prompts)}
    else:
        ids, mask = padded(prompts)
        inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        model(**inputs, pixel_values=llava_pixels(images))
    return patch


# ----------------------------------------------------------------------------- per-stage counts
@pytest.mark.parametrize(
    "options, visual",
    [
        ({}, [16, 8, 4, 2]),  # default: boundaries after layers 1, 2, 3 of 4 (1/4, 1/2, 3/4), lambda 0.5
        ({"keep": 0.75}, [16, 12, 9, 7]),  # 16 x 0.75^s: 12, 9, 6.75 -> 7 (half up)
        ({"layers": (2,)}, [16, 16, 8, 8]),  # one boundary: two stages
        ({"stages": (0.5, 0.75), "keep": 0.25}, [16, 16, 4, 1]),
        ({"layers": (1, 3), "ratios": (0.5, 0.25)}, [16, 8, 8, 4]),  # the reference's image_token_ratio_list
        ({"keep": 0.0}, [16, 0, 0, 0]),
    ],
)
def test_each_stage_holds_its_count(options, visual):
    patch = run(build_llava(), [PROMPT], 1, **options)
    state = patch.state
    assert state.visual_per_layer() == [[v] for v in visual]
    assert [n for n, _ in state.tokens_per_layer()] == [7 + v for v in visual]
    # Each stage's tokens are a subset of the previous stage's: nothing comes back.
    for before, after in pairwise(state.index_in):
        assert set(after[0].tolist()) <= set(before[0].tolist())


def test_counts_per_sample_in_a_padded_batch_and_with_two_images():
    patch = run(build_llava(), [TWO_IMAGES, PROMPT], 3)
    assert patch.state.visual_per_layer() == [[32, 16], [16, 8], [8, 4], [4, 2]]


def test_qwen2_vl_counts_and_positions():
    """3-axis (M-RoPE) positions: counts per stage, and the kept tokens keep their own positions."""
    case = families()["qwen2-vl"]
    model = case.build()
    patch = tokenprune.apply(model, "pyramiddrop", keep=0.5)
    with torch.no_grad():
        model(**case.inputs(["a"]))
    n = sum(t in case.visual_ids for t in case.samples["a"])
    assert patch.state.visual_per_layer() == [[count(0.5**s, n)] for s in range(4)]


# ----------------------------------------------------------------------------- the ranking, against HF eager attention
def eager_attention_per_layer(model) -> tuple[list, list]:
    """Forward hooks on every layer's attention module: its eager ``(B, H, N, N)`` weights, per call."""
    seen: list[torch.Tensor] = []
    layers = model.model.language_model.layers
    handles = [
        getattr(layer, "base_layer", layer).self_attn.register_forward_hook(
            lambda module, args, out: seen.append(out[1].detach().double())
        )
        for layer in layers
    ]
    return seen, handles


@pytest.mark.parametrize("options", [{}, {"keep": 0.75}, {"layers": (1, 3), "ratios": (0.75, 0.25)}])
@pytest.mark.parametrize("prompts, images", [([PROMPT], 1), ([TWO_IMAGES], 2), ([TWO_IMAGES, PROMPT], 3)])
def test_each_boundary_keeps_the_top_tokens_of_the_last_tokens_eager_attention(options, prompts, images):
    """At every boundary ``b``: the visual tokens entering layer ``b`` are the ``count`` highest of the last prompt
    token's attention (head mean) in layer ``b - 1``, as HF's eager attention computed it on that layer's tokens."""
    model = build_llava(attn="eager")
    patch = tokenprune.apply(model, "pyramiddrop", **options)
    seen, handles = eager_attention_per_layer(model)
    ids, mask = padded(prompts) if len(prompts) > 1 else (torch.tensor(prompts), None)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=llava_pixels(images))
    finally:
        for handle in handles:
            handle.remove()
    state = patch.state
    boundaries = patch.runtime.method.boundaries(4)
    for layer in range(3):
        entering, leaving = state.index_in[layer], state.index_in[layer + 1]
        for b in range(len(prompts)):
            positions = entering[b].tolist()
            kept = set(leaving[b].tolist())
            visual = [i for i, p in enumerate(positions) if p >= 0 and ids[b, p] == LLAVA_ID]
            want = state.targets_list[layer + 1][b]
            if layer + 1 not in boundaries:
                assert {positions[i] for i in visual} <= kept and len(visual) == want
                continue
            last = max(i for i, p in enumerate(positions) if p >= 0)  # left fill and padding come first
            row = seen[layer][b, :, last].mean(dim=0)  # (N,) head mean of the last token's attention
            ranked = sorted(visual, key=lambda i: (-float(row[i]), i))
            assert {p for p in leaving[b].tolist() if p >= 0 and ids[b, p] == LLAVA_ID} == {
                positions[i] for i in ranked[:want]
            }, (layer, b)


# ----------------------------------------------------------------------------- FLOPs budgets
@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_flops_budget_is_a_fraction_of_llm_prefill(budget):
    model = build_llava()
    patch = run(model, [PROMPT], 1, flops=budget)
    assert patch.schedule is None  # solved per prompt
    adapter, state = patch.adapter, patch.state

    def llm(table):
        return sum(row["flops"] for row in table["layers"])

    full = llm(adapter.analytic_flops(len(PROMPT), [0] * 4))
    # lambda moves in steps of 1/16 (the first stage's count): the closest reachable budget.
    assert abs(llm(adapter.flops_for(state)) / full - budget) < 0.03
    counts = [v[0] for v in state.visual_per_layer()]
    lam = counts[1] / 16
    assert counts == [16, *(count(lam**s, 16) for s in (1, 2, 3))]  # the pyramid, at the solved lambda


def test_unreachable_flops_budget_names_the_valid_range():
    model = build_llava()
    tokenprune.apply(model, "pyramiddrop", flops=0.2)  # layer 0 always sees all 16 visual tokens
    with pytest.raises(ValueError, match=r"valid budgets are in \[0\.[0-9]+, 1\]"), torch.no_grad():
        model(input_ids=torch.tensor([PROMPT]), pixel_values=llava_pixels(1))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"stages": (0.5, 0.25)}, ValueError, "strictly increasing"),
        ({"stages": (0.5, 1.0)}, ValueError, r"in \(0, 1\)"),
        ({"stages": (0.0, 0.5)}, ValueError, r"stages must be in \(0, 1\]"),
        ({"stages": ()}, TypeError, "non-empty list"),
        ({"stages": "0.5"}, TypeError, "non-empty list"),
        ({"stages": (0.5,), "layers": (2,)}, ValueError, "either stages"),
        ({"layers": (2, 2)}, ValueError, "strictly increasing"),
        ({"layers": (0, 2)}, ValueError, "ints >= 1"),
        ({"layers": (1.5,)}, ValueError, "ints >= 1"),
        ({"keep": 1.5}, ValueError, r"keep must be in \[0, 1\]"),
        ({"keep": 0.5, "flops": 0.5}, ValueError, "one of keep, ratios or flops"),
        ({"keep": 0.5, "ratios": (0.5, 0.25, 0.1)}, ValueError, "one of keep, ratios or flops"),
        ({"ratios": (0.5, 0.25)}, ValueError, r"one entry per stage boundary \(3\)"),
        ({"ratios": (0.25, 0.5, 0.1)}, ValueError, "non-increasing"),
        ({"flops": 0.0}, ValueError, "flops"),
        ({"lambda": 0.5}, TypeError, "valid"),
    ],
)
def test_bad_options_raise_naming_what_is_valid(options, error, match):
    with pytest.raises(error, match=match):
        tokenprune.apply(build_llava(), "pyramiddrop", **options)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"layers": (2, 4)}, r"layers=\[2, 4\] does not fit a language model of 4 layers.*\[1, 3\]"),
        ({"stages": (0.25, 0.3)}, r"after layers \[1, 1\]"),  # two fractions, one layer of 4
        ({"stages": (0.1,)}, r"after layers \[0\]"),
        ({"stages": (0.9,)}, r"after layers \[4\]"),
    ],
)
def test_boundaries_that_do_not_fit_the_depth_are_refused_at_apply(options, match):
    with pytest.raises(ValueError, match=match):
        tokenprune.apply(build_llava(), "pyramiddrop", **options)

"""``dart``: the kept set against a naive float64 reference, FLOPs budgets, errors.

What every method has on every family (exactness, remove(), batches, generate, sdpa == eager, FLOPs == counter)
is in test_vlm_matrix. Here, on the tiny LLaVA (16 visual tokens per image, 4 layers; Llama and Qwen2 text
models): the visual tokens entering layer ``k`` are exactly DART's choice, recomputed per sample with Python
loops in float64 from what layer ``k - 1`` itself produced, captured by hooks on the unwrapped HF layer (its
``k_proj`` output, its output hidden states), not from tokenprune's context.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import LLAVA_ID, build_llava, llava_pixels, llava_prompt, padded
from tokenprune.methods.vlm import count

PROMPT = llava_prompt([1, 5, 6], [7, 8, 9, 10])  # 16 visual tokens, then 4 instruction tokens
TWO_IMAGES = llava_prompt([1, 11], [12, 13, 14], images=2)  # 32 visual tokens, token 3 between the images
NO_INSTRUCTION = llava_prompt([1, 5, 6], [])  # the image ends the prompt: no text pivot


def build(text: str = "llama"):
    """The tiny LLaVA with a random final-norm weight (HF initialises it to ones, under which the normed and raw
    hidden states have the same cosines: ``norm=`` would not show)."""
    model = build_llava(text)
    with torch.no_grad():
        weight = model.model.language_model.norm.weight
        weight.copy_(torch.empty_like(weight).uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(3)))
    return model


def capture(model, layer: int) -> tuple[dict, list]:
    """Hooks on the HF layer ``layer`` (under tokenprune's wrapper): its keys before RoPE ``(B, N, Hkv*D)`` and its
    output hidden states ``(B, N, C)``, in float64."""
    block = model.model.language_model.layers[layer]
    block = getattr(block, "base_layer", block)
    seen: dict = {}

    def after(module, args, out):
        seen["hidden"] = (out[0] if isinstance(out, tuple) else out).double()

    handles = [
        block.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(keys=out.double())),
        block.register_forward_hook(after),
    ]
    return seen, handles


def reference(
    model, seen: dict, ids: torch.Tensor, valid: torch.Tensor, keep: list[int], options: dict
) -> list[set[int]]:
    """DART's kept visual positions per sample, by hand in float64 (exact budget, pivots in sequence order)."""
    pivot_image, pivot_text = options.get("pivot_image", 4), options.get("pivot_text", 4)
    batch, n, _ = seen["keys"].shape
    norms = seen["keys"].abs().sum(dim=-1)  # (B, N) L1 norm over every head, before RoPE
    hidden = seen["hidden"]
    if options.get("norm", True):  # the language model's final RMSNorm, in float64
        norm = model.model.language_model.norm
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        hidden = hidden * norm.weight.detach().double()
    kept = []
    for b in range(batch):
        real = [i for i in range(n) if valid[b, i]]
        visual = [i for i in real if ids[b, i] == LLAVA_ID]
        text = [i for i in real if i > visual[0] and ids[b, i] != LLAVA_ID]
        if keep[b] >= len(visual):
            kept.append(set(visual))
            continue
        by_norm = sorted(visual, key=lambda i: (-float(norms[b, i]), i))
        images = by_norm[: min(pivot_image, keep[b])]
        texts = sorted(text, key=lambda i: (-float(norms[b, i]), i))[:pivot_text]
        pivots = sorted(images + texts)
        rest = keep[b] - len(images)
        left = [i for i in visual if i not in images]
        chosen = []
        for j, pivot in enumerate(pivots):
            share = rest // len(pivots) + (j < rest % len(pivots))
            h = hidden[b, pivot]
            similarity = {i: float(h @ hidden[b, i] / (h.norm() * hidden[b, i].norm())) for i in left}
            picks = sorted(left, key=lambda i: (similarity[i], i))[:share]  # least similar first
            chosen += picks
            left = [i for i in left if i not in picks]
        assert len(images) + len(chosen) == keep[b]
        kept.append(set(images) | set(chosen))
    return kept


OPTIONS = [
    {},  # default keep 0.222 of 16: 4 tokens, the 4 image pivots
    {"keep": 0.5},  # 8: 4 image pivots, then 4 chosen by the first 4 of 8 pivots
    {"keep": 0.75, "pivot_image": 2, "pivot_text": 3},
    {"keep": 0.5, "norm": False},
    {"keep": 0.125},  # 2 tokens: fewer than the 4 image pivots
    {"k": 1, "keep": 0.6, "pivot_image": 0, "pivot_text": 2},  # only text pivots
    {"k": 3, "keep": 0.4, "pivot_image": 1, "pivot_text": 0},  # only one image pivot
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    "prompts, images, side",
    [
        ([PROMPT], 1, "left"),
        ([TWO_IMAGES], 2, "left"),
        ([TWO_IMAGES, PROMPT], 3, "left"),
        ([PROMPT, TWO_IMAGES], 3, "right"),
    ],
)
def test_kept_set_equals_a_float64_reference(options, prompts, images, side):
    model = build()
    patch = tokenprune.apply(model, "dart", **options)
    k = options.get("k", 2)
    seen, handles = capture(model, k - 1)
    ids, mask = padded(prompts, side)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=llava_pixels(images))
    finally:
        for handle in handles:
            handle.remove()
    state = patch.state
    keep = state.targets_list[k]
    assert keep == [count(options.get("keep", 0.222), 16 * (2 if p is TWO_IMAGES else 1)) for p in prompts]
    expected = reference(model, seen, ids, mask.bool(), keep, options)
    for b in range(len(prompts)):
        entering = [p for p in state.index_in[k][b].tolist() if p >= 0 and ids[b, p] == LLAVA_ID]
        assert set(entering) == expected[b], b
        assert state.visual_per_layer()[k - 1][b] == sum(ids[b] == LLAVA_ID)  # layers before k see every one


@pytest.mark.parametrize("options", [{"keep": 0.5}, {"keep": 0.3, "pivot_image": 2, "pivot_text": 1}])
def test_kept_set_on_a_qwen2_text_model(options):
    """Qwen2's biased key projection: the hooked ``k_proj`` output includes the bias, as the layer uses it."""
    model = build("qwen2")
    patch = tokenprune.apply(model, "dart", **options)
    seen, handles = capture(model, 1)
    ids = torch.tensor([TWO_IMAGES])
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=llava_pixels(2))
    finally:
        for handle in handles:
            handle.remove()
    keep = patch.state.targets_list[2]
    expected = reference(model, seen, ids, torch.ones_like(ids, dtype=torch.bool), keep, options)
    entering = {p for p in patch.state.index_in[2][0].tolist() if ids[0, p] == LLAVA_ID}
    assert entering == expected[0]


# ----------------------------------------------------------------------------- FLOPs budgets
@pytest.mark.parametrize("budget", [0.7, 0.8, 0.9])
def test_flops_budget_is_a_fraction_of_llm_prefill(budget):
    model = build()
    patch = tokenprune.apply(model, "dart", flops=budget)
    assert patch.schedule is None  # solved per prompt
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPT]), pixel_values=llava_pixels(1))
    adapter, state = patch.adapter, patch.state

    def llm(table):
        return sum(row["flops"] for row in table["layers"])

    full = llm(adapter.analytic_flops(len(PROMPT), [0] * 4))
    # One visual token more or less in the last two layers moves the cost by ~1/20 of a layer.
    assert abs(llm(adapter.flops_for(state)) / full - budget) < 0.03
    counts = [v[0] for v in state.visual_per_layer()]
    assert counts[:2] == [16, 16] and counts[2] == counts[3] < 16


def test_unreachable_flops_budget_names_the_valid_range():
    model = build()
    tokenprune.apply(model, "dart", flops=0.3)  # k=2 of 4 layers always see all 16 visual tokens
    with pytest.raises(ValueError, match=r"valid budgets are in \[0\.6"), torch.no_grad():
        model(input_ids=torch.tensor([PROMPT]), pixel_values=llava_pixels(1))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"k": 0}, ValueError, "k must be an int >= 1"),
        ({"k": 4}, ValueError, r"1 <= k <= 3"),
        ({"k": 2.0}, ValueError, "k must be an int"),
        ({"keep": -0.1}, ValueError, r"keep must be in \[0, 1\]"),
        ({"keep": 0.5, "flops": 0.5}, ValueError, "either keep or flops"),
        ({"pivot_image": -1}, ValueError, "pivot_image must be an int >= 0"),
        ({"pivot_text": 1.5}, ValueError, "pivot_text must be an int >= 0"),
        ({"pivot_image": 0, "pivot_text": 0}, ValueError, "pivot_image \\+ pivot_text must be >= 1"),
        ({"norm": "yes"}, TypeError, "norm must be a bool"),
        ({"pivots": 4}, TypeError, "valid"),
    ],
)
def test_bad_options_raise_naming_what_is_valid(options, error, match):
    with pytest.raises(error, match=match):
        tokenprune.apply(build(), "dart", **options)


def test_a_prompt_without_any_pivot_is_refused():
    """pivot_image=0 leaves only text pivots: a prompt whose image ends it has none, so nothing can be chosen."""
    model = build()
    tokenprune.apply(model, "dart", keep=0.5, pivot_image=0)
    with pytest.raises(ValueError, match="no pivot.*pivot_image >= 1"), torch.no_grad():
        model(input_ids=torch.tensor([NO_INSTRUCTION]), pixel_values=llava_pixels(1))
    with torch.no_grad():  # with an image pivot the same prompt runs
        model._tokenprune_patch.remove()
        patch = tokenprune.apply(model, "dart", keep=0.5, pivot_image=1)
        model(input_ids=torch.tensor([NO_INSTRUCTION]), pixel_values=llava_pixels(1))
    assert patch.state.visual_per_layer() == [[16], [16], [8], [8]]

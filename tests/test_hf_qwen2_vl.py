"""Qwen2-VL (transformers 5.x) with ``fastv`` and ``aim``: visual tokens removed for real, M-RoPE positions kept.

Tiny random-weight model built from a config (vision depth 1, embed 32, patch 14, spatial merge 2: an 8x8-patch
image gives 16 visual tokens, a 4x8 one 8; text hidden 64, 4 layers, GQA 4/2 heads, head_dim 16, mrope_section
[2, 3, 3], vocab 200): nothing is downloaded. The removal against an independent reference: the unpatched
layers run by hand on the kept tokens at the 3-axis positions the model's own ``get_rope_index`` gives them,
prefill and every decode step of ``generate()``.
What every method has on every family (zero reduction, remove(), batches, generate, FLOPs) is in test_vlm_matrix.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import QWEN_PATCH_DIM as PATCH_DIM
from tests.helpers.vlm_families import build_qwen2_vl as build
from tests.helpers.vlm_families import padded
from tests.helpers.vlm_families import qwen_prompt as prompt

IMG, VID, VSTART, VEND, PAD = 199, 198, 197, 196, 0
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75, "merge_positions": "original"},
}
# One 16-token image + 8 text tokens: visual tokens entering each of the 4 layers, and sequence lengths.
EXPECTED_VISUAL = {"fastv": [16, 16, 8, 8], "aim": [8, 8, 4, 0]}
EXPECTED_TOKENS = {"fastv": [24, 24, 16, 16], "aim": [16, 16, 12, 8]}
GRIDS = [[(1, 8, 8)], [(1, 4, 8)]]  # 16 and 8 visual tokens (the second not square: h and w axes differ)
PROMPTS = [prompt([1, 5], [7, 8, 9, 10], GRIDS[0]), prompt([1, 11, 4], [12, 13, 14, 15, 16, 17], GRIDS[1])]


def pixels(grids: list[tuple[int, int, int]], seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def inputs(samples: list[int], side: str = "left") -> dict:
    """Padded inputs for ``PROMPTS[i]`` of ``samples`` (each with its own image)."""
    ids, mask = padded([PROMPTS[i] for i in samples], side)
    grids = [g for i in samples for g in GRIDS[i]]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMG).int(),
        "pixel_values": torch.cat([pixels(GRIDS[i], seed=i + 1) for i in samples]),
        "image_grid_thw": torch.tensor(grids),
    }


def greedy(model, kwargs: dict, steps: int = 5, **extra):
    return model.generate(**kwargs, max_new_tokens=steps, do_sample=False, **extra)


def rope_positions(model, kwargs: dict) -> torch.Tensor:
    """``(3, B, L)`` the model's own M-RoPE positions of the prompt (images and/or videos)."""
    grids = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    positions, _ = model.model.get_rope_index(
        kwargs["input_ids"],
        mm_token_type_ids=kwargs["mm_token_type_ids"],
        attention_mask=kwargs.get("attention_mask"),
        **{key: kwargs[key] for key in grids if kwargs.get(key) is not None},
    )
    return positions


# ----------------------------------------------------------------------------- exactness first
# ----------------------------------------------------------------------------- schedule and positions
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_sequence_and_cache_lengths_follow_the_schedule(method):
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        out = model(**inputs([0]))
    state, lengths = patch.state, EXPECTED_TOKENS[method]
    assert state.visual_per_layer() == [[v] for v in EXPECTED_VISUAL[method]]
    assert [n for n, _ in state.tokens_per_layer()] == lengths
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == lengths
    text = [i for i, t in enumerate(PROMPTS[0]) if t != IMG]
    index = state.index[0].tolist()
    assert [i for i in index if PROMPTS[0][i] != IMG] == text and index == sorted(index)


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_kept_tokens_keep_their_original_3axis_positions(method):
    """Every layer's (cos, sin) are the rotary embedding of get_rope_index's positions of the tokens it sees."""
    model = build()
    x = inputs([0, 1])
    lm = model.model.language_model
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_embeddings"]), with_kwargs=True)
        for layer in lm.layers
    ]
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        model(**x)
    for handle in handles:
        handle.remove()
    positions = rope_positions(model, x)  # (3, B, L)
    for layer, index in enumerate(patch.state.index_in):
        gathered = positions.gather(-1, index.clamp(min=0).expand(3, *index.shape))  # (3, B, N_l)
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), gathered)
        valid = (index >= 0)[..., None]
        assert torch.equal(torch.where(valid, seen[layer][0], 0), torch.where(valid, cos, 0)), layer
        assert torch.equal(torch.where(valid, seen[layer][1], 0), torch.where(valid, sin, 0)), layer
    assert patch.state.reduced


def _by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
    """The original layers on ``slots[l]`` (indices into ``embeds`` ``(1, N, C)``) at ``positions`` ``(3, 1, N)``."""
    lm = model.model.language_model
    hidden, current = embeds, torch.arange(embeds.shape[1])
    with torch.no_grad():
        for layer, block in enumerate(lm.layers):
            block = getattr(block, "base_layer", block)
            hidden = hidden[:, torch.searchsorted(current, slots[layer])]
            current = slots[layer]
            n = len(current)
            causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            pe = lm.rotary_emb(hidden, positions[..., current])
            hidden = block(hidden, attention_mask=causal, position_embeddings=pe)
        return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize(
    "attn, family", [("sdpa", "qwen2"), ("eager", "qwen2"), ("sdpa", "qwen2.5")], ids=lambda v: str(v)
)
@pytest.mark.parametrize(
    "method, options",
    [
        ("fastv", REDUCING["fastv"]),
        ("fastv", {"k": 1, "keep": 0.25}),
        ("aim", REDUCING["aim"]),
        ("aim", {"merge_keep": 1.0, "prune_start": 0.5, "prune_end": 0.5}),
    ],
)
def test_prefill_and_every_decode_step_match_the_reference(method, options, attn, family):
    """Prefill and each decode step of generate() == the unpatched layers by hand at the original 3D positions."""
    model = build(attn, family)
    x = inputs([1])
    x.pop("attention_mask")
    patch = tokenprune.apply(model, method, **options)
    seen = {}

    def keep_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    with torch.no_grad():
        prefill = model(**x).logits
    hook.remove()
    state = patch.state
    first = state.index_in[0][0]  # input positions entering the LLM (after any merge)
    positions = rope_positions(model, x)[..., first]  # (3, 1, N): original 3-axis positions of what enters the LLM
    slots = [torch.searchsorted(first, index[0]) for index in state.index_in]
    embeds = seen["embeds"]
    torch.testing.assert_close(_by_hand(model, embeds, positions, slots), prefill, rtol=0, atol=1e-5)

    steps = 4
    with torch.no_grad():
        out = greedy(model, x, steps, return_dict_in_generate=True, output_logits=True)
    new = out.sequences[0, x["input_ids"].shape[1] :]
    lm = model.model.language_model
    for step in range(steps):
        grown = torch.cat([embeds, lm.embed_tokens(new[:step])[None]], dim=1)
        tail = positions.amax() + 1 + torch.arange(step)  # decode continues after the prompt's largest position
        grown_positions = torch.cat([positions, tail.expand(3, 1, step)], dim=-1)
        extra = torch.arange(embeds.shape[1], embeds.shape[1] + step)
        reference = _by_hand(model, grown, grown_positions, [torch.cat([s, extra]) for s in slots])
        torch.testing.assert_close(reference[0, -1], out.logits[step][0], rtol=0, atol=1e-5)

    # A plain forward on the prefill's cache (no position_ids: the model numbers the new token itself).
    with torch.no_grad():
        first_step = model(**x)
        token = out.sequences[:, x["input_ids"].shape[1], None]
        second = model(input_ids=token, cache=first_step.cache, mm_token_type_ids=torch.zeros_like(token))
    torch.testing.assert_close(second.logits[0, -1], out.logits[1][0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- batches
# ----------------------------------------------------------------------------- errors
def test_compact_merge_positions_are_refused_but_prune_only_aim_works():
    model = build()
    with pytest.raises(NotImplementedError, match="merge_positions='original'"):
        tokenprune.apply(model, "aim", merge_keep=0.5)
    assert not hasattr(model, "_tokenprune_patch")
    patch = tokenprune.apply(model, "aim", merge_keep=1.0, prune_start=0.25, prune_end=0.75)
    assert type(patch.adapter).__name__ == "Qwen2VLAdapter"
    with torch.no_grad():
        model(**inputs([0]))
    assert patch.state.visual_per_layer() == [[16], [16], [8], [0]]


# ----------------------------------------------------------------------------- spans, embeddings, FLOPs
def test_images_are_split_by_grid_and_merged_separately():
    """Two images in one prompt (16 + 8 tokens, even back to back): each is its own span, merged on its own."""
    from tokenprune.adapters.vlm.qwen2_vl import grid_segments

    grids = [(1, 8, 8), (1, 4, 8)]
    ids = [1, 5] + [IMG] * 24 + [7, 8]  # no separator: only image_grid_thw tells the images apart
    visual = torch.tensor([ids]) == IMG
    segments = grid_segments(visual, torch.tensor(grids), 2)[0]
    assert segments[visual[0]].tolist() == [0] * 16 + [1] * 8 and (segments[~visual[0]] == -1).all()

    model = build()
    ids = torch.tensor([prompt([1, 5], [7, 8], grids)])
    x = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == IMG).int(),
        "pixel_values": pixels(grids),
        "image_grid_thw": torch.tensor(grids),
    }
    patch = tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=1.0, prune_end=1.0, merge_positions="original")
    with torch.no_grad():
        model(**x)
    state = patch.state
    assert state.spans == [[16, 8]]
    first = state.index[0][state.visual[0]] < ids[0].tolist().index(VEND)
    sizes = state.size[0][state.visual[0]]
    assert int(first.sum()) == 8 and len(sizes) == 12
    assert sizes[first].sum() == 16 and sizes[~first].sum() == 8


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_inputs_embeds_calls_reduce_the_same(method):
    model = build()
    x = inputs([0])
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        expected = model(**x).logits
        index = patch.state.index
        ids = x.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        model.model.rope_deltas = None
        got = model(inputs_embeds=embeds, **x, position_ids=rope_positions(model, {"input_ids": ids, **x})).logits
    assert torch.equal(patch.state.index, index)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "method, options, family",
    [  # every method's example and a budget: test_vlm_matrix
        ("fastv", {"keep": 1.0}, "qwen2"),
        ("fastv", REDUCING["fastv"], "qwen2.5-windows"),
    ],
)
def test_analytic_flops_equal_the_flop_counter(method, options, family):
    """Vision tower + merger + merging + every LLM layer (+ scoring) + LM head, as torch counts them."""
    model = build(family=family)
    patch = tokenprune.apply(model, method, **options)
    report = tokenprune.count_flops(model, inputs([0]))
    assert report.analytic == pytest.approx(report.measured, rel=1e-12)
    assert report.embed > 0 and [row["tokens_in"] for row in report.layers] == [
        n for n, _ in patch.state.tokens_per_layer()
    ]


def test_labels_are_refused_while_reducing():
    model = build()
    x = inputs([0])
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**x, labels=x["input_ids"])
    with tokenprune.disabled(model), torch.no_grad():
        assert model(**x, labels=x["input_ids"]).loss is not None

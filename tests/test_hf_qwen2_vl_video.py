"""Qwen2-VL / Qwen2.5-VL with video inputs (alone and mixed with images): frames merged apart, 3-axis positions kept.

The tiny random-weight models of ``test_hf_qwen2_vl`` (spatial merge 2, temporal patch 2). A video of grid
``(t, h, w)`` (patches) reaches the LLM as ``t`` frames of ``(h / 2) x (w / 2)`` placeholders; here the video is
``(3, 4, 8)``: 3 frames of 8 tokens, and the image ``(1, 8, 8)``: 16 tokens, so a merge call's size tells a
frame from the image. Qwen2.5-VL runs get ``second_per_grid_ts`` (temporal positions 8 apart, not 1).
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import qwen_inputs
from tests.test_hf_qwen2_vl import IMG, PATCH_DIM, VID, _by_hand, build, greedy, padded, prompt, rope_positions
from tokenprune.methods.vlm import PreLLMContext

ZERO = {
    "fastv": {"keep": 1.0},
    "aim": {"merge_keep": 1.0, "prune_start": 1.0, "prune_end": 1.0},
    "random_visual": {"keep": 1.0},
}
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "random_visual": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75, "merge_positions": "original"},
}
VIDEO, IMAGE = (3, 4, 8), (1, 8, 8)
FRAME = VIDEO[1] * VIDEO[2] // 4  # placeholders per video frame
# Prompts: (text before, [(kind, grid), ...] each wrapped in vision start/end, text after).
SAMPLES = {
    "video": ([1, 5], [("video", VIDEO)], [7, 8, 9, 10]),
    "image": ([1, 11, 4], [("image", IMAGE)], [12, 13, 14, 15, 16, 17]),
    "mixed": ([1, 6], [("image", IMAGE), ("video", VIDEO)], [7, 8, 9]),
}


def ids_of(name: str) -> list[int]:
    before, media, after = SAMPLES[name]
    return prompt(before, after, [grid for _, grid in media], [IMG if kind == "image" else VID for kind, _ in media])


def inputs(names: list[str], side: str = "left", family: str = "qwen2") -> dict:
    """Padded keyword inputs for the prompts ``names``; every image / video gets its own random pixels."""
    ids, mask = padded([ids_of(n) for n in names], side)
    media = {"image": [], "video": []}
    for name in names:
        for index, (kind, grid) in enumerate(SAMPLES[name][1]):
            seed = 10 * list(SAMPLES).index(name) + index  # the same pixels whatever the batch
            patches = torch.randn(grid[0] * grid[1] * grid[2], PATCH_DIM, generator=torch.Generator().manual_seed(seed))
            media[kind].append((grid, patches))
    return qwen_inputs(ids, mask, media, family)


# ----------------------------------------------------------------------------- exactness first
@pytest.mark.parametrize("family", ["qwen2", "qwen2.5"])
@pytest.mark.parametrize("method", ["fastv", "aim", "random_visual"])
def test_spans_are_the_image_and_each_frame(method, family):
    """Zero reduction (bit-exact: test_vlm_matrix) still splits videos: one span per frame, one per image."""
    model = build(family=family)
    patch = tokenprune.apply(model, method, **ZERO[method])
    with torch.no_grad():
        model(**inputs(["video", "mixed"], family=family))
    assert patch.state.spans == [[FRAME] * 3, [16] + [FRAME] * 3] and not patch.state.reduced


def test_remove_restores_modules_and_outputs_with_videos():
    model = build()
    x = inputs(["mixed"])
    module_types = [(name, type(m)) for name, m in model.named_modules()]
    with torch.no_grad():
        expected = model(**x).logits
        expected_tokens = greedy(model, x, 3)
        patch = tokenprune.apply(model, "aim", **REDUCING["aim"])
        reduced = model(**x).logits
        greedy(model, x, 3)
        assert patch.remove() is model
        restored = model(**x).logits
        restored_tokens = greedy(model, x, 3)
    assert reduced.shape[1] < expected.shape[1]
    assert torch.equal(restored, expected) and torch.equal(restored_tokens, expected_tokens)
    assert [(name, type(m)) for name, m in model.named_modules()] == module_types


# ----------------------------------------------------------------------------- per-frame merging, positions
@pytest.mark.parametrize("family", ["qwen2", "qwen2.5"])
def test_merging_is_per_frame_and_tokens_keep_their_3axis_positions(family):
    """AIM merges every frame (and the image) alone; each layer sees get_rope_index's positions of its tokens."""
    model = build(family=family)
    x = inputs(["video", "mixed"], family=family)
    lm = model.model.language_model
    patch = tokenprune.apply(model, "aim", **REDUCING["aim"])
    method = patch.runtime.method
    merge, merge_sizes, seen = method.merge, [], {"embeds": [], "layers": []}

    def recording_merge(ctx):
        merge_sizes.append(tuple(ctx.embeds.shape[:2]))  # (spans merged together, tokens per span)
        return merge(ctx)

    method.merge = recording_merge
    hooks = [lm.register_forward_pre_hook(lambda m, a, k: seen["embeds"].append(k["inputs_embeds"]), with_kwargs=True)]
    hooks += [
        layer.base_layer.register_forward_pre_hook(
            lambda m, a, k: seen["layers"].append(k["position_embeddings"]), with_kwargs=True
        )
        for layer in lm.layers  # the wrapped layers: they run on the kept tokens only
    ]
    with torch.no_grad():
        model(**x)
        with tokenprune.disabled(model):
            model(**x)
    for handle in hooks:
        handle.remove()
    merged_embeds, embeds = seen["embeds"]  # (B, N0, C) entering the first layer; (B, L, C) before merging
    state, first = patch.state, patch.state.index_in[0]  # first: (B, N0) input position of each LLM token
    # Each merge call holds whole frames of 8 tokens or a whole 16-token image: 6 frames together, 1 image.
    assert sorted(merge_sizes) == [(1, 16), (6, FRAME)]

    # Every frame merged alone from its own tokens: the same merged tokens, at positions of that frame.
    for b in range(2):
        video = (x["input_ids"][b] == VID).nonzero().squeeze(1)  # (3 * FRAME,) the video, frame after frame
        for frame in video.view(3, FRAME):
            local, reference, held, _ = merge(
                PreLLMContext(embeds[b, frame][None], FRAME // 2)
            )  # (1, 4), (1, 4, C), (1, 4), group
            slots = ((first[b] >= frame[0]) & (first[b] <= frame[-1])).nonzero().squeeze(1)
            assert first[b, slots].tolist() == frame[local[0]].sort().values.tolist() and held.sum() == FRAME
            order = local[0].argsort()  # the reference's tokens in spatial order
            torch.testing.assert_close(merged_embeds[b, slots], reference[0, order], rtol=0, atol=1e-6)

    positions = rope_positions(model, x)  # (3, B, L): the model's own (temporal, h, w) of every input token
    for layer, index in enumerate(state.index_in):
        gathered = positions.gather(-1, index.clamp(min=0).expand(3, *index.shape))  # (3, B, N_l)
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), gathered)
        valid = (index >= 0)[..., None]
        assert torch.equal(torch.where(valid, seen["layers"][layer][0], 0), torch.where(valid, cos, 0)), layer
        assert torch.equal(torch.where(valid, seen["layers"][layer][1], 0), torch.where(valid, sin, 0)), layer
    assert state.visual_per_layer() == [[12, 20], [12, 20], [6, 10], [0, 0]]


def test_prefill_matches_the_unpatched_layers_by_hand():
    """Qwen2.5-VL, a video with temporal positions 8 apart: the original layers on the kept tokens, by hand."""
    model = build(family="qwen2.5")
    x = inputs(["video"], family="qwen2.5")
    x.pop("attention_mask")
    patch = tokenprune.apply(model, "aim", **REDUCING["aim"])
    seen = {}
    lm = model.model.language_model

    def keep_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = lm.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    with torch.no_grad():
        prefill = model(**x).logits
    hook.remove()
    first = patch.state.index_in[0][0]  # input positions entering the LLM (after merging)
    positions = rope_positions(model, x)[..., first]  # (3, 1, N): their original 3-axis positions
    temporal = positions[0, 0, x["input_ids"][0, first] == VID].unique()  # one temporal position per frame
    assert temporal.diff().tolist() == [8, 8]
    slots = [torch.searchsorted(first, index[0]) for index in patch.state.index_in]
    reference = _by_hand(model, seen["embeds"], positions, slots)
    torch.testing.assert_close(reference, prefill, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- schedule, batches, generate
# Visual tokens entering each of the 4 layers, alone: the video (24 tokens, 8 text) and image + video (40, 9).
EXPECTED_VISUAL = {
    ("video", "fastv"): [24, 24, 12, 12],
    ("video", "random_visual"): [24, 24, 12, 12],
    ("video", "aim"): [12, 12, 6, 0],
    ("mixed", "fastv"): [40, 40, 20, 20],
    ("mixed", "random_visual"): [40, 40, 20, 20],
    ("mixed", "aim"): [20, 20, 10, 0],
}
TEXT = {"video": 8, "mixed": 9}


@pytest.mark.parametrize("name, method", list(EXPECTED_VISUAL))
def test_sequence_and_cache_lengths_follow_the_schedule(name, method):
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        out = model(**inputs([name]))
    state, visual = patch.state, EXPECTED_VISUAL[name, method]
    lengths = [TEXT[name] + v for v in visual]
    assert state.visual_per_layer() == [[v] for v in visual]
    assert [n for n, _ in state.tokens_per_layer()] == lengths
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == lengths
    ids = ids_of(name)
    index = state.index[0].tolist()
    assert [i for i in index if ids[i] not in (IMG, VID)] == [i for i, t in enumerate(ids) if t not in (IMG, VID)]
    assert index == sorted(index)


@pytest.mark.parametrize("method", ["aim"])  # every method: test_vlm_matrix
def test_batched_generate_equals_samples_alone(method):
    """Qwen2.5-VL (temporal positions 8 apart): generate() merges per frame and decodes on the compact cache."""
    model = build(family="qwen2.5")
    patch = tokenprune.apply(model, method, **REDUCING[method])
    names = ["video", "mixed"]
    with torch.no_grad():
        batched = greedy(model, inputs(names, family="qwen2.5"), 4)
        assert patch.state.spans == [[FRAME] * 3, [16] + [FRAME] * 3]  # generate() passes no grids
        width = max(len(ids_of(n)) for n in names)
        for b, name in enumerate(names):
            alone = greedy(model, inputs([name], family="qwen2.5"), 4)
            assert batched[b, width:].tolist() == alone[0, len(ids_of(name)) :].tolist()


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize(
    "method, options, family",
    [  # unpatched and every method's example: test_vlm_matrix
        ("fastv", {"keep": 1.0}, "qwen2"),
        ("aim", {"flops": 0.5, "merge_positions": "original"}, "qwen2"),
        ("fastv", REDUCING["fastv"], "qwen2.5-windows"),
    ],
)
def test_analytic_flops_equal_the_flop_counter(method, options, family):
    """Vision tower on the image and every frame + merging + LLM layers (+ scoring) + LM head, as torch counts."""
    model = build(family=family)
    patch = tokenprune.apply(model, method, **options) if method else None
    report = tokenprune.count_flops(model, inputs(["mixed"], family=family))
    assert report.analytic == pytest.approx(report.measured, rel=1e-12)
    assert report.embed > 0
    if patch is not None:
        assert [row["tokens_in"] for row in report.layers] == [n for n, _ in patch.state.tokens_per_layer()]

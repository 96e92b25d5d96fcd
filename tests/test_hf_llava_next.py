"""LLaVA-NeXT and LLaVA-NeXT-Video (transformers 5.x, anyres): visual tokens removed for real.

Tiny random-weight models built from configs (CLIP 32px / patch 8 -> 16 patches per crop, class token dropped
under ``vision_feature_select_strategy="default"``; pinpoints 32x64, 64x32, 64x64; Llama text model, hidden 64,
4 layers, GQA 4/2 heads, vocab 200): nothing is downloaded. The two image sizes unpad the high-res grid two ways:
(20, 64) -> a 4 x 8 grid of 2 tiles keeps rows 1-2 -> 16 + 2 x (8 + 1) = 34 placeholders; (64, 40) -> an 8 x 8
grid of 4 tiles keeps columns 1-6 -> 16 + 8 x (6 + 1) = 72. A video frame is 4 x 4 patches average-pooled by 2.

What every method has on every family is in test_vlm_matrix; here, what is LLaVA-NeXT's: the anyres layout
against one written by hand, the spans (base grid, high-res grid, every video frame), the newline tokens kept as
structural, FastV's kept positions against HF's own eager attention, prefill and every decode step against the
unpatched layers run by hand on the kept tokens, and the tower signals against the tower's eager attention packed
(or pooled) by hand. Tolerances: 1e-5 (float32) for the references, 1e-6 for the tower's attention.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import NEXT_TALL as TALL
from tests.helpers.vlm_families import NEXT_WIDE as WIDE
from tests.helpers.vlm_families import families
from tests.test_hf_llava import _by_hand, _llm_inputs
from tokenprune.adapters.vlm.llava_next import LlavaNextAdapter, LlavaNextVideoAdapter

IMAGE, VIDEO, SIDE = 199, 198, 4  # placeholder ids; patches per side of one crop
BASE, HIGH_RES, NEWLINE = 0, 1, 2
#: The high-res grid HF keeps after unpadding: (tiles per row, kept rows, kept columns).
GRIDS = {WIDE: (2, range(1, 3), range(8)), TALL: (2, range(8), range(1, 7))}
CROPS = {WIDE: 3, TALL: 5}


def case(video: bool = False):
    return families()["llava-next-video" if video else "llava-next"]


def hand_layout(size: tuple[int, int]) -> list[int]:
    """The kind of each placeholder of one image: the base grid, then each kept high-res row and its newline."""
    _, rows, cols = GRIDS[size]
    return [BASE] * SIDE**2 + [k for _ in rows for k in [HIGH_RES] * len(cols) + [NEWLINE]]


def hand_pack(crops: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-patch values ``(crops, 1 + 16)`` (class token first) of one image -> one per placeholder (newlines 0).

    The high-res token at stitched row ``r``, column ``c`` is patch ``(r % 4, c % 4)`` of tile
    ``(r // 4) * tiles + c // 4`` (crop ``1 +`` that: crop 0 is the base image).
    """
    tiles, rows, cols = GRIDS[size]
    out = list(crops[0, 1:])
    for r in rows:
        out += [crops[1 + (r // SIDE) * tiles + c // SIDE, 1 + (r % SIDE) * SIDE + c % SIDE] for c in cols]
        out.append(torch.zeros(()))
    return torch.stack(out)


def positions(ids: list[int], kind: int, size: tuple[int, int]) -> list[int]:
    """Input positions of the placeholders of ``kind`` of the one image in prompt ``ids``."""
    start = ids.index(IMAGE)
    return [start + i for i, k in enumerate(hand_layout(size)) if k == kind]


# ----------------------------------------------------------------------------- the anyres layout
def test_layout_is_the_hand_layout_and_agrees_with_hf_features():
    model = case().build()
    adapter = tokenprune.apply(model, "none").adapter
    assert type(adapter) is LlavaNextAdapter
    inputs = case().inputs(["a", "b"])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    kinds, crops = adapter.image_layouts(inputs["image_sizes"])
    assert [k.tolist() for k in kinds] == [hand_layout(WIDE), hand_layout(TALL)]
    assert [len(f) for f in features] == [34, 72] and crops == [CROPS[WIDE], CROPS[TALL]]
    # generate() passes packed features: newlines are read back as exact copies of image_newline.
    assert [k.tolist() for k in adapter.feature_layouts(features)] == [hand_layout(WIDE), hand_layout(TALL)]
    assert adapter.num_tokens(TALL) == 72
    with pytest.raises(NotImplementedError, match="input_size"):
        adapter.num_tokens()


def test_every_image_of_a_prompt_is_tiled():
    """Unlike LLaVA-OneVision (base crops only when a prompt holds several images), LLaVA-NeXT tiles each."""
    model = case().build()
    inputs = case().inputs(["a", "b"])
    ids = [1, 5] + [IMAGE] * 34 + [3] + [IMAGE] * 72 + [7, 8]
    inputs = {"input_ids": torch.tensor([ids]), **{k: inputs[k] for k in ("pixel_values", "image_sizes")}}
    patch = tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=0.5, prune_end=1.0)
    with torch.no_grad():
        model(**inputs)  # HF checks the placeholder count against its features
    state = patch.state
    assert state.spans == [[16, 16, 16, 48]] and int(state.structural.sum()) == 2 + 8
    table = patch.adapter.flops_for(state)
    assert table["embed"] - table["merge"] == pytest.approx(8 * patch.adapter.vision_flops())  # 3 + 5 crops
    report = tokenprune.count_flops(model, inputs)
    assert report.analytic == pytest.approx(report.measured, rel=1e-9)


# ----------------------------------------------------------------------------- spans and structural newlines
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_newlines_are_kept_in_every_layer_and_never_visual(method):
    model = case().build()
    options = {"fastv": {"k": 1, "keep": 0.25}, "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.5}}
    patch = tokenprune.apply(model, method, **options[method])
    ids = case().samples["b"]
    with torch.no_grad():
        model(**case().inputs(["b"]))
    state = patch.state
    newlines = positions(ids, NEWLINE, TALL)
    text = [i for i, t in enumerate(ids) if t != IMAGE]
    assert state.spans == [[16, 48]] and state.index[0][state.structural[0]].tolist() == newlines
    for index in state.index_in:
        assert set(text + newlines) <= set(index[0].tolist())
    kept = torch.isin(state.index[0], torch.tensor(newlines))
    assert int(kept.sum()) == 8 and not bool(state.visual[0][kept].any()) and bool((state.size[0][kept] == 1).all())
    assert state.visual_per_layer()[-1][0] < 64


def test_aim_merges_within_each_grid():
    model = case().build()
    patch = tokenprune.apply(model, "aim", merge_keep=0.25, prune_start=1.0, prune_end=1.0)
    ids = case().samples["b"]
    with torch.no_grad():
        model(**case().inputs(["b"]))
    state = patch.state
    index, size, visual = state.index[0], state.size[0], state.visual[0]
    base = visual & torch.isin(index, torch.tensor(positions(ids, BASE, TALL)))
    high_res = visual & torch.isin(index, torch.tensor(positions(ids, HIGH_RES, TALL)))
    assert int(base.sum()) == 4 and int(high_res.sum()) == 12 and int(visual.sum()) == 16  # 16 -> 4, 48 -> 12
    assert int(size[base].sum()) == 16 and int(size[high_res].sum()) == 48


# ----------------------------------------------------------------------------- against independent references
def test_fastv_keeps_the_tokens_hf_eager_attention_ranks_highest():
    """Layer k-1's last-row attention (HF eager), newlines left out of the ranking: the kept visual tokens."""
    model = case().build("eager")
    ids, inputs = case().samples["b"], case().inputs(["b"])
    with torch.no_grad():
        attention = model(**inputs, output_attentions=True).attentions[1][0].mean(dim=0)[-1]  # (L,)
    visual = torch.tensor(positions(ids, BASE, TALL) + positions(ids, HIGH_RES, TALL))
    expected = visual[attention[visual].topk(len(visual) // 2).indices].sort().values
    patch = tokenprune.apply(model, "fastv", k=2, keep=0.5)
    with torch.no_grad():
        model(**inputs)
    protected = [i for i, t in enumerate(ids) if t != IMAGE] + positions(ids, NEWLINE, TALL)
    assert patch.state.index_in[2][0].tolist() == sorted(protected + expected.tolist())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "video, method, options",
    [
        (False, "fastv", {"k": 2, "keep": 0.5}),
        (False, "aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75}),
        (True, "aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75}),
        (True, "visionzip", {"keep": 0.5}),
    ],
)
def test_prefill_and_every_decode_step_match_the_reference(video, method, options, attn):
    """Prefill logits and each decode step's == the unpatched layers run by hand on the kept tokens."""
    model = case(video).build(attn)
    inputs = case(video).inputs(["mixed" if video else "b"])
    patch = tokenprune.apply(model, method, **options)
    seen = _llm_inputs(model, lambda: model(**inputs))
    with torch.no_grad():
        prefill = model(**inputs).logits
    state = patch.state
    assert state.reduced
    embeds, pos = seen["embeds"], seen["positions"]
    pos = torch.arange(embeds.shape[1])[None] if pos is None else pos
    slots = [torch.searchsorted(state.index_in[0][0], index[0]) for index in state.index_in]
    torch.testing.assert_close(_by_hand(model, embeds, pos, slots), prefill, rtol=0, atol=1e-5)

    steps = 3
    with torch.no_grad():
        out = case(video).greedy(model, inputs, steps, return_dict_in_generate=True, output_logits=True)
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    lm = model.model.language_model
    for step in range(steps):
        grown = torch.cat([embeds, lm.embed_tokens(new[:step])[None]], dim=1)
        grown_pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(step)[None]], dim=1)
        extra = torch.arange(embeds.shape[1], embeds.shape[1] + step)
        reference = _by_hand(model, grown, grown_pos, [torch.cat([s, extra]) for s in slots])
        torch.testing.assert_close(reference[0, -1], out.logits[step][0], rtol=0, atol=1e-5)


def _tower_signals(model, inputs: dict, monkeypatch) -> tuple[object, list]:
    """The TowerSequence visionzip reads, and the tower's calls (to rerun them with eager attention)."""
    sequences, calls = [], []
    video = isinstance(model, hf.LlavaNextVideoForConditionalGeneration)
    adapter_cls = LlavaNextVideoAdapter if video else LlavaNextAdapter
    original = adapter_cls.tower_sequence

    def recording(self, found, runs):
        out = original(self, found, runs)
        sequences.append(out)
        return out

    monkeypatch.setattr(adapter_cls, "tower_sequence", recording)
    tower = model.model.vision_tower
    handle = tower.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        patch = tokenprune.apply(model, "visionzip", keep=0.5)
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    (sequence,) = sequences
    layer = sequence.layer
    cls_rows = []
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        for args, kwargs in calls:  # (crops or frames, H, 1 + 16, 1 + 16) -> the class token's row, head mean
            attention = tower(*args, **{**kwargs, "output_attentions": True}).attentions[layer]
            cls_rows.append(attention[:, :, 0].mean(dim=1))
    tower.set_attn_implementation("sdpa")
    patch.remove()
    return sequence, cls_rows


def test_tower_signals_are_the_class_tokens_eager_attention_packed_as_hf_packs_features(monkeypatch):
    model = case().build()
    ids = case().samples["b"]
    sequence, (rows,) = _tower_signals(model, case().inputs(["b"]), monkeypatch)
    assert sequence.from_class_token and rows.shape == (CROPS[TALL], 17)
    start = ids.index(IMAGE)
    got = sequence.attention[0, start : start + 72]
    torch.testing.assert_close(got, hand_pack(rows, TALL), rtol=0, atol=1e-6)
    assert bool((sequence.attention[0, [i for i, t in enumerate(ids) if t != IMAGE]] == 0).all())


def test_video_tower_signals_are_pooled_per_frame_and_apart_from_the_image(monkeypatch):
    """``mixed`` (a WIDE image, then a 3-frame video): image signals packed, frame signals 2 x 2 means."""
    model = case(True).build()
    ids = case(True).samples["mixed"]
    sequence, (image_rows, frame_rows) = _tower_signals(model, case(True).inputs(["mixed"]), monkeypatch)
    start = ids.index(IMAGE)
    torch.testing.assert_close(
        sequence.attention[0, start : start + 34], hand_pack(image_rows, WIDE), rtol=0, atol=1e-6
    )
    grid = frame_rows[:, 1:].view(3, 2, 2, 2, 2)  # (frames, row block, row, column block, column)
    expected = grid.mean(dim=(2, 4)).flatten()  # (frames * 4,): frame-major, pooled tokens row-major
    video = [i for i, t in enumerate(ids) if t == VIDEO]
    torch.testing.assert_close(sequence.attention[0, video], expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- LLaVA-NeXT-Video
def test_every_video_frame_is_its_own_span():
    model = case(True).build()
    patch = tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=1.0, prune_end=1.0)
    assert type(patch.adapter) is LlavaNextVideoAdapter and patch.adapter.frame_tokens() == 4
    ids = case(True).samples["mixed"]
    with torch.no_grad():
        model(**case(True).inputs(["mixed"]))
    state = patch.state
    assert state.spans == [[16, 16, 4, 4, 4]]  # base grid, high-res grid, then one span per frame
    video = [i for i, t in enumerate(ids) if t == VIDEO]
    index, size = state.index[0], state.size[0]
    for frame in range(3):  # each frame 4 -> 2, holding exactly its own 4 tokens
        mine = torch.isin(index, torch.tensor(video[4 * frame : 4 * frame + 4]))
        assert int(mine.sum()) == 2 and int(size[mine].sum()) == 4
    table = patch.adapter.flops_for(state)  # 3 crops of the image, 3 frames of the video
    adapter = patch.adapter
    assert table["embed"] - table["merge"] == pytest.approx(3 * adapter.vision_flops() + 3 * adapter.frame_flops())


def test_a_video_only_prompt_counts_no_stale_image_crops():
    model = case(True).build()
    patch = tokenprune.apply(model, "fastv", k=2, keep=0.5)
    with torch.no_grad():
        model(**case(True).inputs(["a"]))
        model(**case(True).inputs(["video"]))
    assert patch.state.spans == [[4, 4, 4]]
    table = patch.adapter.flops_for(patch.state)
    assert table["embed"] == pytest.approx(3 * patch.adapter.frame_flops())


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("video", [False, True])
def test_other_attention_implementations_are_refused(video):
    model = case(video).build()
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports \['sdpa', 'eager'\]"):
        tokenprune.apply(model, "fastv")


def test_a_renamed_video_resampler_is_named():
    model = case(True).build()
    del model.model.vision_resampler
    with pytest.raises(TypeError, match="vision_resampler"):
        tokenprune.apply(model, "fastv")

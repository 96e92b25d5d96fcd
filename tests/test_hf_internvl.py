"""InternVL (transformers 5.x): tiles as spans, layout tokens as text, tower signals against HF's eager attention.

Tiny random-weight models built from configs (InternViT 32px / patch 4 -> 64 patches + a class token, pixel
shuffle 0.5 -> 16 ``<IMG_CONTEXT>`` tokens per tile; Qwen2 text model, hidden 64, 4 layers, GQA 4/2 heads, vocab
200): nothing is downloaded. Prompts are written as the processor writes them: ``<img>``, every tile's
placeholders (a 1 x 2 grid then its thumbnail), ``</img>``; video frames after ``FrameN:`` text.

What every method has on every family (zero reduction, remove(), lengths following the state, batches, beams,
generate, sdpa == eager, FLOPs == counter) is in test_vlm_matrix; here, tile spans, layout tokens, batches of
different tile counts, the tower signals and the tower's FLOPs.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import (
    INTERN_END,
    INTERN_IMAGE,
    INTERN_START,
    INTERN_TILES,
    INTERN_TOKENS,
    build_internvl,
    families,
    intern_pixels,
)
from tokenprune.measure.flops import measure_flops
from tokenprune.methods.visionzip import VisionZip

CASE = families()["internvl"]
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.25, "prune_start": 1.0, "prune_end": 1.0},
    "visionzip": {"tokens": 4, "contextual": 0.5},  # 2 dominant + 2 contextual tokens per tile
    "divprune": {"tokens": 3},
}
KEPT = {"aim": 4, "visionzip": 4, "divprune": 3}  # visual tokens each tile keeps before the LLM


def tile_starts(ids: list[int]) -> list[int]:
    """Input position of each tile's first placeholder (a run of placeholders holds 16 per tile)."""
    visual = [i for i, t in enumerate(ids) if t == INTERN_IMAGE]
    return visual[::INTERN_TOKENS]


def run(model, names: list[str], side: str = "left") -> None:
    with torch.no_grad():
        model(**CASE.inputs(names, side))


# ----------------------------------------------------------------------------- spans and layout tokens
@pytest.mark.parametrize("method", list(REDUCING))
@pytest.mark.parametrize("name", ["a", "frames"])
def test_every_tile_is_its_own_span_and_layout_tokens_stay(method, name):
    """Tiles (and the thumbnail) never share a merge group; ``<img>``, ``</img>``, ``FrameN:`` are never touched."""
    ids = CASE.samples[name]
    model = CASE.build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    run(model, [name])
    state = patch.state
    assert state.spans == [[INTERN_TOKENS] * INTERN_TILES[name]]
    layout = [i for i, t in enumerate(ids) if t != INTERN_IMAGE]
    assert {ids[i] for i in layout} >= {INTERN_START, INTERN_END}
    for index in state.index_in:  # every layout/text token in every layer, in order
        assert [i for i in index[0].tolist() if ids[i] != INTERN_IMAGE] == layout
    tile = torch.full((len(ids),), -1)
    for number, start in enumerate(tile_starts(ids)):
        tile[start : start + INTERN_TOKENS] = number
    source = state.source[0]
    kept = source >= 0
    assert bool((tile[source[kept]] == tile[kept]).all())  # a token stands only for tokens of its own tile
    if method in KEPT:  # reduced before the LLM: each tile keeps its own share (merged ones: its whole mass)
        visual = state.visual[0]
        for number in range(INTERN_TILES[name]):
            mine = visual & (tile[state.index[0]] == number)
            mass = INTERN_TOKENS if method in ("aim", "visionzip") else KEPT[method]
            assert int(mine.sum()) == KEPT[method] and int(state.size[0][mine].sum()) == mass


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["visionzip", "aim"])
def test_a_padded_batch_of_different_tile_counts_has_each_samples_tiles(method, side):
    """3 tiles, 1 tile and 2 frames in one batch: each sample's spans and kept counts (rows == alone: the matrix)."""
    names = ["a", "b", "frames"]
    model = CASE.build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    run(model, names, side)
    state = patch.state
    assert state.spans == [[INTERN_TOKENS] * INTERN_TILES[n] for n in names]
    assert state.visual_in[0].tolist() == [KEPT[method] * INTERN_TILES[n] for n in names]


# ----------------------------------------------------------------------------- tower signals
@pytest.fixture
def recorded(monkeypatch):
    """Every pre-LLM context visionzip's merge sees."""
    seen = []
    merge = VisionZip.merge

    def recording(self, ctx):
        seen.append(ctx)
        return merge(self, ctx)

    monkeypatch.setattr(VisionZip, "merge", recording)
    return seen


def shuffled_patches(model) -> torch.Tensor:
    """``(16, 4)`` the patch indices HF's own pixel shuffle folds into each LLM token of a tile."""
    grid = torch.arange(64, dtype=torch.float32).view(1, 8, 8, 1)  # (1, side, side, channels=1)
    return model.model.pixel_shuffle(grid, scale_factor=0.5).reshape(16, 4).long()


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_tower_signals_equal_hf_eager_class_attention_and_keys(recorded, qk_norm, layer):
    """Class-token attention (HF eager ``output_attentions``) and keys, averaged over each token's 4 patches."""
    model = build_internvl(qk_norm=qk_norm)
    tower = model.model.vision_tower
    pixels = intern_pixels("a")
    inputs = {"input_ids": torch.tensor([CASE.samples["a"]]), "pixel_values": pixels}
    block = tower.encoder.layer[layer]
    entering = []
    handle = block.register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    with torch.no_grad():
        tokenprune.apply(model, "visionzip", keep=0.5, contextual=0.25, layer=layer)
        model(**inputs)
        handle.remove()
        tower.set_attn_implementation("eager")
        attention = tower(pixel_values=pixels, output_attentions=True).attentions[layer]  # (I, H, 65, 65)
        attn = block.attention
        keys = attn.k_norm(attn.k_proj(block.layernorm_before(entering[0])))  # (I, 65, H * D)
    keys = keys.unflatten(-1, (2, 16)).mean(dim=2)  # (I, 65, D) mean over heads
    groups = shuffled_patches(model)  # (16, 4)
    expected_attention = attention[:, :, 0, 1:].mean(dim=1)[:, groups].mean(dim=-1)  # (I, 16)
    expected_keys = keys[:, 1:][:, groups].mean(dim=2)  # (I, 16, D)
    signals = recorded[0].tower
    assert signals.from_class_token and signals.layer == layer
    torch.testing.assert_close(signals.attention.float(), expected_attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(signals.keys.float(), expected_keys, rtol=1e-5, atol=1e-6)


def test_tower_tokens_follow_hfs_pixel_shuffle():
    model = CASE.build()
    adapter = tokenprune.apply(model, "none").adapter
    signal = torch.randn(3, 65, 5)  # (I, 1 + 64, ...): the class token first
    expected = signal[:, 1:][:, shuffled_patches(model)].mean(dim=2).flatten(0, 1)  # (I * 16, 5)
    torch.testing.assert_close(adapter.tower_tokens(signal), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- FLOPs
def test_vision_flops_are_the_tower_and_projector_as_torch_counts_them():
    model = CASE.build()
    adapter = tokenprune.apply(model, "none").adapter
    measured = measure_flops(model.model.get_image_features, pixel_values=intern_pixels("a"))
    assert measured == pytest.approx(3 * adapter.vision_flops(), rel=1e-12)  # tower + projector, three tiles


@pytest.mark.parametrize("method", ["fastv", "visionzip"])
def test_count_flops_agrees_with_the_analytic_table(method):
    model = CASE.build()
    inputs = CASE.inputs(["a"])
    full = tokenprune.count_flops(model, inputs)
    assert full.analytic == pytest.approx(full.measured, rel=1e-9)
    patch = tokenprune.apply(model, method, **REDUCING[method])
    reduced = tokenprune.count_flops(model, inputs)
    assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9) and reduced.measured < full.measured
    assert full.embed == pytest.approx(3 * patch.adapter.vision_flops())  # three tiles


# ----------------------------------------------------------------------------- errors
def test_the_full_feature_strategy_is_refused():
    model = CASE.build()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="'default'"):
        tokenprune.apply(model, "fastv")


def test_an_unknown_layout_names_the_missing_attribute():
    model = CASE.build()
    del model.model.multi_modal_projector
    with pytest.raises(TypeError, match="multi_modal_projector"):
        tokenprune.apply(model, "fastv")


def test_other_attention_implementations_are_refused():
    model = CASE.build()
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports \['sdpa', 'eager'\]"):
        tokenprune.apply(model, "fastv")

"""Mistral3 (transformers 5.x, Pixtral tower): image spans, structural row-end tokens, tower signals, FLOPs.

A tiny random-weight model built from a config (Pixtral 2 layers, patch 4, 2-D RoPE; 2 x 2 patch merger: 8 px
per LLM token; Mistral text model, hidden 64, 4 layers, GQA 4/2 heads, vocab 200): nothing is downloaded. Prompts
are written as PixtralProcessor writes them: each image is its rows of ``[IMG]``, every row ended by
``[IMG_BREAK]``, the last by ``[IMG_END]``. Sample ``"a"`` holds two images of different sizes ((32, 48): 4 rows
of 6; (16, 24): 2 rows of 3), ``"b"`` one ((24, 32): 3 rows of 4).

What every method has on every family (zero reduction, remove(), lengths following the state, batches,
generate, sdpa == eager, FLOPs == counter) is in test_vlm_matrix; here, the layout, per-image spans, the tower
signals against HF's own eager attention, and the tower's FLOPs against the counter on HF's tower alone. Last,
Pixtral-12B's layout: ``LlavaForConditionalGeneration`` with a Pixtral tower and no patch merger.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import MISTRAL_BREAK, MISTRAL_END, MISTRAL_IMAGE, families
from tokenprune.adapters.vlm.llava import LlavaAdapter
from tokenprune.adapters.vlm.mistral3 import Mistral3Adapter, PixtralLlavaAdapter, image_segments, row_ends
from tokenprune.measure.flops import measure_flops

IMG, BREAK, END = MISTRAL_IMAGE, MISTRAL_BREAK, MISTRAL_END
SPANS = {"a": [24, 6], "b": [12]}  # [IMG] per image
ROW_ENDS = {"a": 4 + 2, "b": 3}
GRIDS = {"a": [(8, 12), (4, 6)], "b": [(6, 8)]}  # patches per image


def case():
    return families()["mistral3"]


def reference_layout(ids: list[int]) -> tuple[list[int], list[int]]:
    """Per token, by reading the ids one at a time: its image (-1: none) and whether it is a row-end token."""
    image, owners, ends = -1, [], []
    for i, token in enumerate(ids):
        if token == IMG and (i == 0 or ids[i - 1] not in (IMG, BREAK)):
            image += 1  # an image starts: the first [IMG] not after a row of the same image
        owners.append(image if token == IMG else -1)
        ends.append(token in (BREAK, END))
    return owners, ends


# ----------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("names", [["a"], ["b"], ["a", "b"], ["b", "text", "a"]])
def test_spans_are_images_and_row_end_tokens_are_structural(names):
    """Each image one span of its [IMG]; [IMG_BREAK] / [IMG_END] structural; text neither (padded batches too)."""
    model = case().build()
    adapter = Mistral3Adapter(model)
    inputs = case().inputs(names, "right")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    found = adapter.find_visual(inputs["input_ids"], dict(inputs))
    offset = 0
    for row, name in enumerate(names):
        owners, ends = reference_layout(case().samples[name])
        width = len(owners)
        expected = [o + offset if o >= 0 else -1 for o in owners]
        offset += len(SPANS.get(name, []))
        assert found.segments[row, :width].tolist() == expected
        assert found.structural[row, :width].tolist() == ends and sum(ends) == ROW_ENDS.get(name, 0)
        assert not found.structural[row, width:].any() and not found.visual[row, width:].any()
    assert found.visual.tolist() == (inputs["input_ids"] == IMG).tolist()
    counts = torch.bincount(found.segments[found.visual]).tolist()
    assert counts == [len(f) for f in features] == [n for name in names for n in SPANS.get(name, [])]


def test_layout_from_encoded_features_and_without_counts():
    """generate() passes ``mm_encoder_outputs`` (no sizes): the same spans; with neither, rows group into images."""
    model = case().build()
    adapter = Mistral3Adapter(model)
    inputs = case().inputs(["a"])
    ids = inputs["input_ids"]
    from_sizes = adapter.find_visual(ids, dict(inputs))
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    from_features = adapter.find_visual(ids, {"input_ids": ids, "mm_encoder_outputs": {"image": encoded}})
    assert torch.equal(from_sizes.segments, from_features.segments)
    assert torch.equal(from_sizes.structural, from_features.structural)
    visual = ids == IMG
    assert torch.equal(image_segments(visual, None), from_sizes.segments)
    assert torch.equal(row_ends(visual), (ids == BREAK) | (ids == END))


@pytest.mark.parametrize(
    ("method", "options"),
    [("fastv", {"k": 2, "keep": 0.5}), ("aim", {"merge_keep": 0.5, "prune_start": 1.0, "prune_end": 1.0})],
)
def test_reduction_keeps_text_and_row_ends_and_merges_within_each_image(method, options):
    model = case().build()
    patch = tokenprune.apply(model, method, **options)
    ids = case().samples["a"]
    with torch.no_grad():
        model(**case().inputs(["a"]))
    state = patch.state
    assert state.spans == [SPANS["a"]]
    visual = [v[0] for v in state.visual_per_layer()]
    assert visual == ([30, 30, 15, 15] if method == "fastv" else [15] * 4)  # AIM merges 24 -> 12, 6 -> 3
    owners, ends = reference_layout(ids)
    kept = [i for i, t in enumerate(ids) if t != IMG]  # text and row ends, in every layer, in order
    for index in state.index_in:
        index = index[0].tolist()
        assert index == sorted(index) and [i for i in index if ids[i] != IMG] == kept
    source = state.source[0].tolist()  # which kept token stands for each input token
    assert all(source[i] == i for i in kept)
    assert all(s == -1 or owners[s] == owners[i] for i, s in enumerate(source) if ids[i] == IMG)
    assert int(state.structural[0].sum()) == sum(ends)


# ----------------------------------------------------------------------------- vision-tower signals
def eager_tower_attention(model, inputs: dict, layer: int) -> torch.Tensor:
    """``(H, S, S)``: HF's own eager attention map of one Pixtral layer over every image of the call."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"], output_attentions=True)
    finally:
        tower.set_attn_implementation("sdpa")
    return out.attentions[layer][0].float()


def per_token(grid: tuple[int, int], values: torch.Tensor) -> torch.Tensor:
    """The mean of each 2 x 2 block of a patch grid's ``values`` ``(h * w, ...)``, one LLM token at a time."""
    rows, cols = grid
    out = []
    for r in range(rows // 2):
        for c in range(cols // 2):
            patches = [(2 * r + dr) * cols + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
            out.append(values[patches].mean(dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("names", [["a"], ["a", "b"]])
@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_tower_signals_are_hfs_eager_attention_per_image(method, names, monkeypatch):
    """Mean attention each token's 2 x 2 patches receive *within its own image* (HF's block-diagonal mask), and
    their head-averaged keys after the 2-D RoPE; one batch call holds all images of all samples."""
    seen, captured = [], []
    original = Mistral3Adapter.tower_sequence

    def recording(self, found, runs):
        captured.extend(runs)
        out = original(self, found, runs)
        seen.append(out)
        return out

    monkeypatch.setattr(Mistral3Adapter, "tower_sequence", recording)
    model, inputs = case().build(), case().inputs(names)
    patch = tokenprune.apply(model, method)
    with torch.no_grad():
        model(**inputs)
    layer = patch.runtime.method.tower_layer % 2
    patch.remove()
    attention = eager_tower_attention(model, inputs, layer)  # (H, S, S)
    run = captured[-1]
    grids = [g for name in names for g in GRIDS[name]]
    assert run.grids == grids
    expected_attention, expected_keys, start = [], [], 0
    for grid in grids:
        end = start + grid[0] * grid[1]
        block = attention[:, start:end, start:end]  # (H, P, P): the image's own rows and columns
        assert float(block.sum()) == pytest.approx((end - start) * attention.shape[0], rel=1e-5)  # nothing leaks
        scale = run.queries.shape[-1] ** -0.5  # the captured (rotated) queries and keys give HF's map
        ours = ((run.queries[:, start:end] @ run.keys[:, start:end].transpose(-1, -2)) * scale).softmax(dim=-1)
        torch.testing.assert_close(ours.float(), block, rtol=0, atol=1e-6)
        expected_attention.append(per_token(grid, block.mean(dim=(0, 1))))  # received: mean over heads, queries
        expected_keys.append(per_token(grid, run.keys[:, start:end].float().mean(dim=0)))
        start = end
    signals = seen[-1]
    placeholders = inputs["input_ids"] == IMG
    torch.testing.assert_close(signals.attention[placeholders], torch.cat(expected_attention), rtol=0, atol=1e-6)
    torch.testing.assert_close(signals.keys[placeholders], torch.cat(expected_keys), rtol=0, atol=1e-6)
    assert not signals.from_class_token and signals.attention[~placeholders].abs().sum() == 0
    costs = [2.0 * (h * w) ** 2 * 32 for h, w in grids]  # one (P x D) @ (D x P) per head, per image
    per_sample = [sum(costs[:2]), sum(costs[2:])] if len(names) == 2 else [sum(costs)]
    assert signals.flops == per_sample


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("names", [["a"], ["b"]])
def test_vision_flops_equal_the_counter_on_hfs_tower_and_projector(names):
    """Analytic tower + projector FLOPs == torch's counter on HF's ``get_image_features`` (padded images)."""
    model = case().build()
    adapter = Mistral3Adapter(model)
    inputs = case().inputs(names)
    measured = measure_flops(model.model.get_image_features, inputs["pixel_values"], inputs["image_sizes"])
    assert measured > 0 and adapter.inputs_vision_flops(inputs) == pytest.approx(measured, rel=1e-12)
    canvas = tuple(s // 4 for s in inputs["pixel_values"].shape[-2:])
    assert adapter.vision_flops(GRIDS[names[0]], canvas) == pytest.approx(measured, rel=1e-12)
    assert adapter.num_tokens((32, 48)) == 24 and adapter.static_image_flops() == 0.0


# ----------------------------------------------------------------------------- errors
def test_other_attention_implementations_are_refused():
    model = case().build()
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports \['sdpa', 'eager'\]"):
        tokenprune.apply(model, "fastv")


def test_an_unknown_layout_is_refused_naming_the_attribute():
    model = case().build()
    del model.model.multi_modal_projector
    with pytest.raises(TypeError, match="'multi_modal_projector'"):
        tokenprune.apply(model, "fastv")
    model = case().build()
    model.model.vision_tower.transformer = torch.nn.Identity()  # no layers where Pixtral keeps them
    with pytest.raises(TypeError, match="'transformer.layers'"):
        tokenprune.apply(model, "visionzip")


def test_labels_are_refused_while_reducing():
    model = case().build()
    inputs = case().inputs(["a"])
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])


def test_registered_for_mistral3_only():
    assert tokenprune.registry.find_adapter(case().build()) is Mistral3Adapter
    text_only = hf.MistralForCausalLM(
        hf.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
        )
    )
    with pytest.raises(TypeError, match="Mistral3ForConditionalGeneration"):
        tokenprune.apply(text_only, "fastv")


# ----------------------------------------------------------------------------- Pixtral-12B: LLaVA with a Pixtral tower
def pixtral_llava():
    return families()["llava-pixtral"]


def test_a_llava_with_a_pixtral_tower_gets_the_pixtral_layout():
    """Pixtral-12B's class is LLaVA's: its Pixtral tower, not the class, picks the layout (CLIP-style LLaVA keeps
    the LLaVA adapter); each image is one span of one token per patch (patch 8 here: Mistral3's case's grids)."""
    model = pixtral_llava().build()
    assert tokenprune.registry.find_adapter(model) is PixtralLlavaAdapter
    assert tokenprune.registry.find_adapter(families()["llava-llama"].build()) is LlavaAdapter
    inputs = pixtral_llava().inputs(["a"])
    patch = tokenprune.apply(model, "divprune", tokens=5)
    with torch.no_grad():
        model(**inputs)
    assert patch.state.spans == [SPANS["a"]] and patch.state.visual_per_layer()[0] == [10]
    structural = patch.state.structural[0]
    ids = inputs["input_ids"][0][patch.state.index[0]]
    assert bool((ids[structural] != IMG).all()) and int(structural.sum()) == ROW_ENDS["a"]


@pytest.mark.parametrize("names", [["a"], ["b"]])
def test_pixtral_llava_vision_flops_equal_the_counter(names):
    model = pixtral_llava().build()
    adapter = PixtralLlavaAdapter(model)
    inputs = pixtral_llava().inputs(names)
    features = functools.partial(model.model.get_image_features, image_sizes=inputs["image_sizes"])
    measured = measure_flops(features, inputs["pixel_values"])
    assert measured > 0 and adapter.inputs_vision_flops(inputs) == pytest.approx(measured, rel=1e-12)


def test_pixtral_llava_with_the_default_feature_strategy_is_refused():
    model = pixtral_llava().build()
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(TypeError, match="vision_feature_select_strategy='full'"):
        tokenprune.apply(model, "fastv")

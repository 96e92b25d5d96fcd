"""The VQA tab's token map and budget control, without a browser.

Token map: the groups drawn at an LLM layer are the ones ``patch.state.source`` / ``index_in`` define (a hand-made
state, and visionzip / AIM on the tiny LLaVA against a one-patch-at-a-time reference and the merged sizes), and the
picture paints every merged group in one colour of its own, tokens of their own as the image, dropped patches dark.
Budget control: read from the registry (``flops=`` wherever the config has it, else the declared budget parameter,
else the example options), including methods registered after the demo was imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import LLAVA_ID, families
from tokenprune import registry
from tokenprune.demo import vqa
from tokenprune.demo.token_maps import DROPPED_RGB, describe_groups, groups_at_layer, render_token_map

CELL = 8


def reference_groups(source: list[int], entering: list[int], positions: list[int]) -> list[int]:
    """Token standing for each patch at one layer, one patch at a time (-1: dropped before or inside the LLM)."""
    alive = {p for p in entering if p >= 0}
    return [source[p] if source[p] >= 0 and source[p] in alive else -1 for p in positions]


def cell_colours(picture: np.ndarray, grid: tuple[int, int]) -> dict[tuple[int, int], set[tuple[int, ...]]]:
    """The colours inside each patch cell (its 1-pixel border left out: outlines are drawn there)."""
    out = {}
    for r in range(grid[0]):
        for c in range(grid[1]):
            inner = picture[r * CELL + 1 : (r + 1) * CELL - 1, c * CELL + 1 : (c + 1) * CELL - 1].reshape(-1, 3)
            out[r, c] = {tuple(int(v) for v in px) for px in inner}
    return out


def plain_crop(grid: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``(gh * CELL, gw * CELL, 3)``: one random flat colour per patch (so a patch's mean is its colour)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(*grid, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colours, CELL, axis=0), CELL, axis=1)


def check_picture(groups: np.ndarray, tint: float) -> None:
    """Every merged group one colour (its patches' mean when ``tint`` is 0; distinct per group otherwise),
    tokens of their own the image, dropped patches dark."""
    grid = groups.shape
    crop = plain_crop(grid)
    colours = cell_colours(render_token_map(crop, groups, cell=CELL, tint=tint), grid)
    members: dict[int, list[tuple[int, int]]] = {}
    for r in range(grid[0]):
        for c in range(grid[1]):
            members.setdefault(int(groups[r, c]), []).append((r, c))
    group_colour = {}
    for token, cells in members.items():
        found = set().union(*(colours[cell] for cell in cells))
        if token < 0:
            assert found == {tuple(DROPPED_RGB)}, cells
        elif len(cells) == 1:
            assert found == {tuple(int(v) for v in crop[cells[0][0] * CELL, cells[0][1] * CELL])}, cells
        else:
            assert len(found) == 1, (token, found)  # one colour for the whole group
            group_colour[token] = found.pop()
            if tint == 0:
                mean = np.mean([crop[r * CELL, c * CELL].astype(float) for r, c in cells], axis=0)
                assert np.abs(np.array(group_colour[token]) - mean).max() <= 0.5 + 1e-9
    if tint > 0:
        assert len(set(group_colour.values())) == len(group_colour)  # a colour of its own per group


def test_hand_made_state_gives_the_groups_source_and_index_in_define():
    # [text, p0 .. p5 (a 2 x 3 grid), text]; p0, p1 merged at p0's position 1; p2 dropped; p3, p4 merged at p4's
    # position 5; p5 a token of its own. Layer 1: the {p0, p1} token and p5 pruned; -1 is a fill slot.
    state = SimpleNamespace(
        source=torch.tensor([[0, 1, 1, -1, 5, 5, 6, 7]]),
        index_in=[torch.tensor([[0, 1, 5, 6, 7]]), torch.tensor([[0, 5, 7, -1]])],
        num_original=8,
    )
    positions = torch.arange(1, 7)
    got = [groups_at_layer(state.source[0], index[0], positions, (2, 3)) for index in state.index_in]
    assert got[0].tolist() == [[1, 1, -1], [5, 5, 6]]
    assert got[1].tolist() == [[-1, -1, -1], [5, 5, -1]]  # the fill slot -1 never revives the dropped p2
    assert describe_groups(got[0]).startswith("2 merged groups hold 4 patches")
    assert "1 patches dropped" in describe_groups(got[0]) and "4 patches dropped" in describe_groups(got[1])
    for groups in got:
        check_picture(groups, tint=0.0)
        check_picture(groups, tint=0.5)


def test_nothing_merged_means_every_patch_is_its_own_token():
    state = SimpleNamespace(source=None, index_in=[torch.arange(6)[None]], num_original=6)
    (groups,) = vqa.layer_groups(state, torch.tensor([1, 2, 3, 4]), grid=2)
    assert groups.tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("method", "options"),
    [("visionzip", {"keep": 0.5, "contextual": 0.25}), ("aim", {"merge_keep": 0.5, "prune_start": 0.25})],
)
def test_tiny_llava_map_matches_source_layer_by_layer(method, options):
    case = families()["llava-llama"]
    model = case.build()
    inputs = case.inputs(["a"])
    positions = (inputs["input_ids"][0] == LLAVA_ID).nonzero().flatten()
    grid = int(round(positions.numel() ** 0.5))
    assert grid * grid == positions.numel() == 16
    patch = tokenprune.apply(model, method, **options)
    try:
        with torch.no_grad():
            model(**inputs)
        state = patch.state
        layers = vqa.layer_groups(state, positions, grid)
    finally:
        patch.remove()
    source = state.source[0].tolist()
    assert len(layers) == case.depth
    merged_any = dropped_any = False
    # The tokens left after the last layer, with the input tokens each holds (sizes do not change in the LLM).
    size = {p: int(n) for p, n in zip(state.index[0].tolist(), state.size[0].tolist(), strict=True) if p >= 0}
    sized: set[int] = set()
    for layer, (groups, index) in enumerate(zip(layers, state.index_in, strict=True)):
        assert groups.ravel().tolist() == reference_groups(source, index[0].tolist(), positions.tolist()), layer
        tokens, counts = np.unique(groups[groups >= 0], return_counts=True)
        assert len(tokens) == int(state.visual_in[layer][0])  # every visual token entering stands for a patch
        for token, count in zip(tokens.tolist(), counts.tolist(), strict=True):
            if token in size:  # a group's size is the input tokens its token holds (the merge's own count)
                assert count == size[token], (layer, token)
                sized.add(token)
        merged_any |= bool((counts > 1).any())
        dropped_any |= bool((groups < 0).any())
        check_picture(groups, tint=0.0)
        check_picture(groups, tint=vqa.TINT)
    assert merged_any, "the example options merge visual tokens: the map must show merged groups"
    if method == "visionzip":
        assert any(size[t] > 1 for t in sized), "no merged group was checked against its size"
    if method == "aim":
        assert dropped_any, "AIM prunes inside the LLM: later layers must show dropped patches"


def test_render_refuses_a_tint_outside_unit_range():
    with pytest.raises(ValueError, match=r"tint must be in \[0, 1\]"):
        render_token_map(plain_crop((2, 2)), np.zeros((2, 2), dtype=np.int64), cell=CELL, tint=1.5)


# ----------------------------------------------------------------------------------------- budget control


def test_every_vlm_method_with_a_flops_field_gets_the_budget_as_flops():
    methods = vqa.vqa_methods()
    assert methods == tuple(m for m in tokenprune.methods(kind="vlm") if m != "none")
    for name in methods:
        if "flops" in registry.get_method(name).config_cls.field_names():
            assert vqa.budget_control(name).option == "flops"
            assert vqa.budget_options(name, 0.3) == {"flops": 0.3}
            assert "`flops=`" in vqa.method_note(name)


@dataclass
class _Options:
    keep: float = 1.0

    @classmethod
    def field_names(cls) -> list[str]:
        return ["keep"]


class _NoFlops:
    """A VLM method without a flops option (budgeted by keep)."""

    kinds: ClassVar[frozenset[str]] = frozenset({"vlm"})
    identity: ClassVar[dict] = {"keep": 1.0}
    example: ClassVar[dict] = {"keep": 0.4}
    control: ClassVar[bool] = False
    budget_parameter: ClassVar[str] = "keep"


class _NoBudget(_NoFlops):
    """A VLM method without any budget option."""

    budget_parameter: ClassVar[str] = ""


def test_methods_without_flops_fall_back_to_registry_data_and_appear_in_the_list():
    registry.register_method("zz_no_flops", _Options, _NoFlops)
    registry.register_method("zz_no_budget", _Options, _NoBudget)
    try:
        assert {"zz_no_flops", "zz_no_budget"} <= set(vqa.vqa_methods())  # read at call time, not import
        assert vqa.budget_options("zz_no_flops", 0.3) == {"keep": 0.3}
        assert "keep" in vqa.budget_control("zz_no_flops").label
        assert vqa.budget_options("zz_no_budget", 0.3) == {"keep": 0.4}  # its example setting
        assert vqa.budget_control("zz_no_budget").option == ""
        assert "no budget option" in vqa.method_note("zz_no_budget")
    finally:
        registry.unregister_method("zz_no_flops")
        registry.unregister_method("zz_no_budget")

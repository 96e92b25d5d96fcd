"""Options the methods acting before the LLM share, checked once for every registered method that has them:
``layer`` (the vision-tower layer of :class:`TowerLayerConfig`) and ``merge_positions``."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import families
from tokenprune import registry
from tokenprune.methods.vlm import TowerLayerConfig

VLM = tokenprune.methods(kind="vlm")
TOWER_LAYER = [m for m in VLM if issubclass(registry.get_method(m).config_cls, TowerLayerConfig)]
POSITIONS = [
    m for m in VLM if "merge_positions" in registry.get_method(m).config_cls.field_names() and "tokens" in
    registry.get_method(m).config_cls.field_names()
]  # fmt: skip


def test_the_option_lists_are_not_empty():
    assert {"visionzip", "vispruner"} <= set(TOWER_LAYER) and {"divprune", "cdpruner"} <= set(POSITIONS)


@pytest.mark.parametrize("method", TOWER_LAYER)
def test_layer_option_picks_the_tower_layer_and_is_checked(method):
    model = families()["llava-llama"].build()  # a 2-layer CLIP tower
    patch = tokenprune.apply(model, method, keep=0.5, layer=0)
    assert patch.runtime.method.tower_layer == 0
    patch.remove()
    assert tokenprune.apply(model, method, keep=0.5).runtime.method.tower_layer == -2  # the papers' default
    tokenprune.get_patch(model).remove()
    with pytest.raises(ValueError, match=r"valid: -2 \.\. 1"):
        tokenprune.apply(model, method, keep=0.5, layer=5)
    with pytest.raises(TypeError, match="layer must be an int"):
        tokenprune.apply(model, method, keep=0.5, layer="last")


@pytest.mark.parametrize("method", POSITIONS)
def test_compact_positions_renumber_the_kept_tokens(method):
    case = families()["llava-llama"]
    model = case.build()
    x = case.inputs(["a"])
    logits = {}
    for positions in ("original", "compact"):
        patch = tokenprune.apply(model, method, tokens=4, merge_positions=positions)
        with torch.no_grad():
            logits[positions] = model(**x).logits
        patch.remove()
    assert logits["compact"].shape[1] == len(case.samples["a"]) - 16 + 4 == logits["original"].shape[1]
    assert not torch.allclose(logits["compact"], logits["original"])  # the text after the image moved up

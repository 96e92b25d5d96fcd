"""Bad input: every case raises a clear exception naming what is valid. Never a print."""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.conftest import build


def test_unknown_method_lists_registered_ones():
    model, _, _ = build("deit_tiny")
    with pytest.raises(ValueError, match=r"unknown method 'toem'; registered methods: ") as info:
        tokenprune.apply(model, "toem", r=2)
    assert all(repr(name) in str(info.value) for name in ["evit", "none", "random", "tome"])


def test_methods_lists_builtin_methods():
    assert {"tome", "evit", "random", "none"} <= set(tokenprune.methods())


def test_non_vit_model_is_rejected_with_supported_list():
    with pytest.raises(TypeError, match=r"unsupported model type Sequential; supported: .*VisionTransformer"):
        tokenprune.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), "tome", r=1)


def test_unknown_option_lists_valid_ones():
    model, _, _ = build("deit_tiny")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rr'\].*valid: \['r', 'flops', .*'prop_attn'\]"):
        tokenprune.apply(model, "tome", rr=2)


def test_r_larger_than_tokens_allow():
    model, _, _ = build("deit_tiny")  # 196 patch tokens: ToMe merges at most 98 per layer
    with pytest.raises(ValueError, match=r"r=99 removes more tokens than the first layer allows.*at most 98"):
        tokenprune.apply(model, "tome", r=99)


def test_list_schedule_of_wrong_length():
    model, _, _ = build("deit_tiny")
    with pytest.raises(ValueError, match=r"one entry per layer: got 3, model has 12"):
        tokenprune.apply(model, "tome", r=[1, 2, 3])


def test_list_schedule_entry_out_of_range():
    model, _, _ = build("deit_tiny")
    with pytest.raises(
        ValueError,
        match=r"entry 50 at layer 1 is out of range: 98 reducible tokens remain there, valid counts are 0\.\.49",
    ):
        tokenprune.apply(model, "tome", r=[98, 50] + [0] * 10)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5])
def test_budget_outside_unit_interval(budget):
    model, _, _ = build("deit_tiny")
    with pytest.raises(ValueError, match=r"flops budget must be in \(0, 1\]"):
        tokenprune.apply(model, "tome", flops=budget)


def test_budget_below_reach_names_the_reachable_range():
    model, _, _ = build("deit_tiny")
    with pytest.raises(ValueError, match=r"below what this method can reach.*valid budgets are in \[0\.\d+, 1\]"):
        tokenprune.apply(model, "tome", flops=0.05)


def test_r_and_flops_together():
    model, _, _ = build("deit_tiny")
    with pytest.raises(ValueError, match="either r or flops"):
        tokenprune.apply(model, "tome", r=4, flops=0.5)


def test_dynamic_model_budget_needs_input_size():
    model, _, _ = build("dinov2_dynamic")
    with pytest.raises(ValueError, match=r"dynamic_img_size=True.*pass input_size"):
        tokenprune.apply(model, "tome", flops=0.5)


def test_evit_without_class_token():
    model, _, _ = build("no_cls_avg")
    with pytest.raises(ValueError, match=r"'evit' .* no class token; methods that work without one"):
        tokenprune.apply(model, "evit", r=2)


def test_applying_twice_raises_until_removed():
    model, _, _ = build("deit_tiny")
    patch = tokenprune.apply(model, "tome", r=2)
    with pytest.raises(RuntimeError, match=r"already patched with 'tome'; call patch.remove\(\) first"):
        tokenprune.apply(model, "evit", r=2)
    patch.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        patch.remove()
    tokenprune.apply(model, "evit", r=2).remove()


def test_none_method_refuses_reduction():
    model, _, _ = build("deit_tiny")
    with pytest.raises(ValueError, match="removes no tokens"):
        tokenprune.apply(model, "none", r=3)


@pytest.mark.parametrize("bad", [1.5, "8", [1, "2"], True])
def test_r_of_wrong_type(bad):
    model, _, _ = build("deit_tiny")
    with pytest.raises(TypeError, match="r must (be|hold)"):
        tokenprune.apply(model, "tome", r=bad)


def test_unsupported_block_type():
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, block_fn=ResPostBlock)
    with pytest.raises(TypeError, match=r"not a supported timm block.*supported: timm.models.vision_transformer.Block"):
        tokenprune.apply(model, "tome", r=1)


def test_caller_attn_mask_under_reduction_is_refused():
    model, images, _ = build("deit_tiny")
    tokenprune.apply(model, "tome", r=2)
    with pytest.raises(NotImplementedError, match="disabled"):
        model(images, attn_mask=torch.zeros(1, 1, 197, 197))
    with tokenprune.disabled(model):
        model(images, attn_mask=torch.zeros(1, 1, 197, 197))

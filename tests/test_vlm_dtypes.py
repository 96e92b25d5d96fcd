"""Every vision-language method x every VLM family in float32 and bfloat16.

* Zero reduction is bit-exact in both dtypes (the patched model is the unpatched one).
* Reduced runs are finite in bfloat16, keep as many tokens per layer as in float32, and where bfloat16 makes the
  same decisions (the same tokens entering every layer, standing for the same inputs: ``state.index_in`` and
  ``state.source``; the same experts picked), its logits are within 0.15 (absolute) of float32's: about 5% of
  these tiny models' logit range (about 3). The tolerance was chosen from a one-off measurement (not a check
  kept here): the unreduced models themselves differ by 0.03-0.07 between the two dtypes. Where bfloat16's
  rounding flips a near-tie (e.g. which pair AIM merges, or which expert a router picks), the logits cannot be
  compared; the counts still are. Qwen3.5's case doubles the tolerance (``VLMCase.bf16_atol``): its linear-attention
  recurrence alone puts its unreduced bfloat16 logits 0.14 from float32's.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import FAMILIES, VLMCase, families, skip_without_tower_merging
from tests.vlm_checks import assert_zero_reduction_exact
from tokenprune import registry

METHODS = tokenprune.methods(kind="vlm")


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    """``inputs`` with every floating tensor (pixels) in ``dtype``."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def options(case: VLMCase, method: str, key: str) -> dict:
    entry = registry.get_method(method)
    return case.options_for(entry.config_cls, getattr(entry, key))


@pytest.fixture(params=FAMILIES)
def case(request) -> VLMCase:
    return families()[request.param]


@pytest.mark.parametrize("method", METHODS)
def test_zero_reduction_is_bit_exact_in_bfloat16(case, method):
    skip_without_tower_merging(case.name, method)
    model = case.build().to(torch.bfloat16)
    inputs = cast(case.inputs(["a"]), torch.bfloat16)
    patch = assert_zero_reduction_exact(model, inputs, method, options(case, method, "identity"), case.greedy)
    patch.remove()


@pytest.mark.parametrize(
    "method", [m for m in METHODS if registry.get_method(m).example != registry.get_method(m).identity]
)
def test_bfloat16_reduction_is_finite_and_close_to_float32(case, method):
    skip_without_tower_merging(case.name, method)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = case.build().to(dtype)
        routed = []  # a mixture of experts' choices are decisions too (bfloat16 can flip a near-tie of its router)
        routers = [m for m in model.modules() if type(m).__name__.endswith("Router")]
        hooks = [m.register_forward_hook(lambda module, args, out, seen=routed: seen.append(out[-1])) for m in routers]
        with torch.no_grad():
            patch = tokenprune.apply(model, method, **options(case, method, "example"))
            logits = model(**cast(case.inputs(["a"]), dtype)).logits.float()
        for hook in hooks:
            hook.remove()
        state = patch.state
        decisions = [state.source, *state.index_in, *routed]  # what stands for what, enters every layer, is routed
        runs[dtype] = (logits, decisions, state.visual_per_layer())
        patch.remove()
    (full, decisions, counts), (half, half_decisions, half_counts) = runs.values()
    assert bool(torch.isfinite(half).all()) and half_counts == counts
    if all(torch.equal(a, b) for a, b in zip(decisions, half_decisions, strict=True)):
        torch.testing.assert_close(half, full, rtol=0, atol=case.bf16_atol)

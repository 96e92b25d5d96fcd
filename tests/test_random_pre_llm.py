"""``random_pre_llm``: exact counts per image, reproducible per seed, and spread over the whole image."""

from __future__ import annotations

import torch

import tokenprune
from tests.helpers.vlm_families import FAMILIES, families
from tokenprune.methods.random_pre_llm import RandomPreLLM, RandomPreLLMConfig
from tokenprune.methods.vlm import PreLLMContext


def test_seeded_draws_are_reproducible_and_differ_between_seeds():
    x = torch.randn(2, 40, 8)
    picks = [RandomPreLLM(RandomPreLLMConfig(seed=s)).merge(PreLLMContext(x, 10)).index for s in (0, 0, 1)]
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    assert bool((picks[0][:, 1:] > picks[0][:, :-1]).all())  # distinct, in spatial order


def test_every_token_is_kept_about_as_often():
    method = RandomPreLLM(RandomPreLLMConfig(seed=0))
    counts = torch.zeros(16)
    for _ in range(400):
        counts += torch.zeros(16).scatter_(0, method.merge(PreLLMContext(torch.randn(1, 16, 4), 4)).index[0], 1.0)
    assert counts.sum() == 1600 and counts.min() > 60 and counts.max() < 140  # expected 100 each


def test_tokens_keeps_exactly_n_per_image_on_every_family():
    for family in FAMILIES:
        case = families()[family]
        model, inputs = case.build(), case.inputs(["a"])
        with torch.no_grad():
            patch = tokenprune.apply(model, "random_pre_llm", **case.options_for(RandomPreLLMConfig, {"tokens": 3}))
            model(**inputs)
        spans = patch.state.spans[0]
        assert int(patch.state.visual_in[0][0]) == sum(min(3, n) for n in spans) < sum(spans), family
        patch.remove()

"""``random_pre_llm``: exact counts per image, reproducible per seed, and spread over the whole image."""

from __future__ import annotations

import torch

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

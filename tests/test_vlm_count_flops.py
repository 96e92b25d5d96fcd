"""tokenprune.count_flops on a vision-language model called with keyword inputs (tiny random LLaVA)."""

from __future__ import annotations

import pytest

import tokenprune
from tests.test_hf_llava import PROMPTS, build, pixels, single


@pytest.mark.parametrize(
    "method, options",
    [("fastv", {"k": 2, "keep": 0.25}), ("aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75})],
)
def test_count_flops_takes_keyword_inputs_and_agrees_with_the_analytic_table(method, options):
    model = build()
    inputs = dict(single(PROMPTS[0]), pixel_values=pixels(1))
    full = tokenprune.count_flops(model, inputs)
    assert full.analytic == pytest.approx(full.measured, rel=1e-9)
    patch = tokenprune.apply(model, method, **options)
    reduced = tokenprune.count_flops(model, inputs)
    assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9)
    assert reduced.measured < full.measured
    assert [row["tokens_in"] for row in reduced.layers] == [n for n, _ in patch.state.tokens_per_layer()]
    assert reduced.layers[-1]["tokens_out"] < full.layers[-1]["tokens_out"]

"""DivPrune specifics: the greedy max-min selection against a brute-force reference, its FLOPs, exact
``tokens=N`` counts on every family, and option errors. (The VLM matrix covers the rest.)"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenprune.methods.divprune import DivPrune, DivPruneConfig
from tokenprune.methods.vlm import PreLLMContext


def brute_force(x: torch.Tensor, keep: int) -> list[int]:
    """The max-min greedy of one set ``x`` ``(n, C)``, one candidate and one pair at a time (float64)."""
    n = x.shape[0]
    unit = [v.double() / v.double().norm() for v in x]

    def distance(i: int, j: int) -> float:
        return 1.0 - float(unit[i] @ unit[j])

    isolation = [min(distance(i, j) for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: isolation[i])]
    while len(chosen) < keep:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(distance(i, j) for j in chosen)))
    return sorted(chosen)


def method(**options) -> DivPrune:
    return DivPrune(DivPruneConfig(**options))


@pytest.mark.parametrize("n", [2, 5, 12])
def test_selection_equals_brute_force_reference(n):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 6, generator=generator)  # (S, n, C): three spans selected together
    for keep in range(1, n):
        reduced = method().merge(PreLLMContext(x, keep))
        assert reduced.index.tolist() == [brute_force(span, keep) for span in x]
        assert torch.equal(reduced.embeds, x.gather(1, reduced.index[..., None].expand(-1, -1, x.shape[-1])))
        assert torch.equal(reduced.size, torch.ones(3, keep))


def test_first_pick_is_the_most_isolated_token_and_duplicates_are_never_picked_twice():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.2], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])[None]  # (1, 6, 2)
    assert method().merge(PreLLMContext(x, 1)).index.tolist() == [[3]]
    index = method().merge(PreLLMContext(x, 5)).index[0]
    assert index.tolist() == sorted(set(index.tolist())) and len(index) == 5  # distinct, ascending


def test_merge_flops_equal_the_counter():
    x = torch.randn(4, 20, 12)
    with FlopCounterMode(display=False) as counter:
        method().merge(PreLLMContext(x, 7))
    assert counter.get_total_flops() == 4 * method().merge_flops(20, 7, 12) == 4 * 2 * 20 * 20 * 12


def test_defaults_and_bad_options():
    assert DivPruneConfig().keep == 0.098 and DivPruneConfig().tokens is None
    assert DivPruneConfig().merge_positions == "original"
    assert method(tokens=8).merged_count(20, 0.0) == 8 and method(tokens=8).merged_count(6, 0.0) == 6
    assert method(keep=0.5).merged_count(20, 0.5) == 10
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            DivPruneConfig(keep=bad)
    for bad, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="int >= 1"):
            DivPruneConfig(tokens=bad)
    with pytest.raises(ValueError, match="one of keep, tokens or flops"):
        DivPruneConfig(keep=0.5, tokens=8)
    with pytest.raises(ValueError, match="one of keep, tokens or flops"):
        DivPruneConfig(tokens=8, flops=0.5)
    with pytest.raises(ValueError, match="'original' or 'compact'"):
        DivPruneConfig(merge_positions="spatial")

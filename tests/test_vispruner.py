"""``vispruner``: its important set is the top-k of the tower's own eager attention, its diverse set equals a
per-token reference of the reference code's de-duplication, its FLOPs equal the counter's, ``tokens=N`` keeps exactly
N per image, bad options raise, defaults are the paper's."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers.recording import eager_token_scores, record_merges
from tests.helpers.vlm_families import families
from tokenprune.methods.vispruner import VisPruner, VisPrunerConfig
from tokenprune.methods.vlm import PreLLMContext, TowerSignals


@pytest.fixture
def recorded(monkeypatch):
    """Every ``(context, reduction)`` pair vispruner's merge sees and returns."""
    return record_merges(monkeypatch, VisPruner)


def reference(attention: torch.Tensor, x: torch.Tensor, keep: int, important: float) -> list[int]:
    """One span, one token and one pair at a time (float64): the reference code's selection, ascending positions.

    Important: the ``int(keep * important)`` highest attentions. The others, by descending attention, lose up to 8
    per round: of the even places ``a``, those most cosine-similar to some odd place ``b`` go; the rest of ``a`` (by
    descending score, the most distinct last) then ``b`` are the next round's order.
    """
    n, chosen = x.shape[0], int(keep * important)
    diverse = keep - chosen
    order = sorted(range(n), key=lambda i: -float(attention[i]))
    residual = order[chosen:]
    unit = {i: x[i].double() / x[i].double().norm() for i in residual}
    while diverse and (r := min(8, len(residual) - diverse)) > 0:
        a, b = residual[0::2], residual[1::2]
        score = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda k: -score[k])
        residual = [a[k] for k in ranked[r:]] + b
    return sorted(order[:chosen] + (residual if diverse else []))


def method(**options) -> VisPruner:
    return VisPruner(VisPrunerConfig(**options))


@pytest.mark.parametrize("family", ["llava-llama", "idefics3"])
def test_important_set_is_the_top_k_of_the_towers_eager_attention(family, recorded):
    """CLIP: the class token's row; SigLIP-style (Idefics3): mean attention received, per pixel-shuffled token."""
    case = families()[family]
    model, inputs = case.build(), case.inputs(["a"])
    scores = eager_token_scores(family, model, inputs, "vispruner", {"keep": 0.5})  # (I, n)
    ctx, out = recorded[0]
    important, diverse = method(keep=0.5).split(ctx.keep)
    assert important > 0 and diverse > 0 and out.index.shape == (scores.shape[0], ctx.keep)
    for s in range(scores.shape[0]):
        top = set(scores[s].topk(important).indices.tolist())
        assert top == set(ctx.tower.attention[s].topk(important).indices.tolist())
        assert top <= set(out.index[s].tolist())
        assert out.index[s].tolist() == reference(scores[s], ctx.embeds[s], ctx.keep, 0.5)
    assert torch.equal(out.embeds, ctx.embeds.gather(1, out.index[..., None].expand(-1, -1, ctx.embeds.shape[-1])))
    assert torch.equal(out.size, torch.ones_like(out.size))


@pytest.mark.parametrize(
    ("n", "keep", "important"),
    [
        (16, 8, 0.5),  # two rounds, the second dropping fewer than 8
        (60, 10, 0.5),  # 55 others: odd rounds, a round that drops all of ``a``
        (9, 2, 0.5),  # rounds that want more than ``a`` holds
        (30, 7, 0.25),  # important rounded down (int(1.75) = 1)
        (25, 6, 0.0),  # all diverse
        (20, 5, 1.0),  # all important: FasterVLM
        (12, 12, 0.5),  # everything kept
    ],
)
def test_selection_equals_the_per_token_reference(n, keep, important):
    generator = torch.Generator().manual_seed(n + keep)
    x = torch.randn(3, n, 6, generator=generator)  # (S, n, C): three spans selected together
    signals = TowerSignals(-2, torch.rand(3, n, generator=generator), torch.randn(3, n, 4, generator=generator), True)
    out = method(keep=0.5, important=important).merge(PreLLMContext(x, keep, signals))
    assert out.index.tolist() == [reference(signals.attention[s], x[s], keep, important) for s in range(3)]
    assert torch.equal(out.embeds, x.gather(1, out.index[..., None].expand(-1, -1, 6)))
    assert torch.equal(out.size, torch.ones(3, keep))


def test_merge_flops_equal_the_counter_on_the_merge():
    torch.manual_seed(0)
    for n, keep, important in [(16, 8, 0.5), (90, 13, 0.5), (9, 2, 0.5), (40, 6, 0.0), (20, 4, 1.0), (10, 10, 0.5)]:
        signals = TowerSignals(-2, torch.rand(3, n), torch.randn(3, n, 12), True)
        ctx = PreLLMContext(torch.randn(3, n, 20), keep, signals)
        pruner = method(keep=0.5, important=important)
        with FlopCounterMode(display=False) as counter:
            out = pruner.merge(ctx)
        flops = pruner.merge_flops(n, keep, 20)
        assert counter.get_total_flops() == 3 * flops
        assert (flops > 0) == (pruner.split(keep)[1] > 0 and keep < n)  # a Gram matrix only where duplicates go
        assert bool((out.index[:, 1:] > out.index[:, :-1]).all()) and out.index.shape == (3, keep)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"keep": 0.5, "tokens": 8}, ValueError, "give one of keep, tokens or flops"),
        ({"tokens": 8, "flops": 0.5}, ValueError, "give one of keep, tokens or flops"),
        ({"keep": 0.0}, ValueError, r"keep must be in \(0, 1\]"),
        ({"tokens": 0}, ValueError, "tokens must be an int >= 1"),
        ({"important": 1.5}, ValueError, r"important .* must be in \[0, 1\]"),
        ({"important": -0.1}, ValueError, r"important .* must be in \[0, 1\]"),
        ({"important": "half"}, TypeError, "important .* must be a number"),
        ({"layer": 1.0}, TypeError, "layer must be an int"),
    ],
)
def test_bad_options_raise_naming_the_valid_values(options, error, message):
    with pytest.raises(error, match=message):
        VisPrunerConfig(**options)


def test_defaults_are_the_papers_32_of_576_half_important():
    config = VisPrunerConfig()
    assert config.keep == 32 / 576 and config.important == 0.5 and config.tokens is None and config.layer is None
    assert VisPruner(config).split(32) == (16, 16) and VisPruner(config).split(64) == (32, 32)
    assert VisPruner(VisPrunerConfig(important=0.75)).split(64) == (48, 16)  # the reference's MME example
    assert VisPruner(config).merged_count(576, config.keep) == 32

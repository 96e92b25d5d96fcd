"""``visionzip``: its dominant set is the top-k of the tower's own eager attention, its contextual tokens equal a
per-token reference on the same tensors, ``tokens=N`` keeps exactly N per image, bad options raise."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers.recording import eager_token_scores, record_merges
from tests.helpers.vlm_families import families
from tokenprune.methods.visionzip import VisionZip, VisionZipConfig
from tokenprune.methods.vlm import PreLLMContext, TowerSignals


@pytest.fixture
def recorded(monkeypatch):
    """Every ``(context, reduction)`` pair visionzip's merge sees and returns."""
    return record_merges(monkeypatch, VisionZip)


def reference(ctx: PreLLMContext, dominant: int, contextual: int) -> tuple[list, list, list]:
    """One span at a time, one token at a time: VisionZip's groups, as plain Python lists."""
    indices, embeds, sizes = [], [], []
    for s in range(ctx.embeds.shape[0]):
        attention, keys, x = ctx.tower.attention[s], ctx.tower.keys[s].float(), ctx.embeds[s].float()
        top = set(attention.topk(dominant).indices.tolist())
        rest = [i for i in range(x.shape[0]) if i not in top]
        step = max(1, len(rest) // contextual)
        targets = [rest[j] for j in range(0, len(rest), step)][:contextual]
        groups = {t: [t] for t in targets}
        for i in rest:
            if i not in groups:
                cosine = [float(torch.cosine_similarity(keys[i], keys[t], dim=0)) for t in targets]
                groups[targets[max(range(contextual), key=lambda j: (cosine[j], -j))]].append(i)
        kept = sorted([(i, x[i], 1) for i in top] + [(t, x[g].mean(dim=0), len(g)) for t, g in groups.items()])
        indices.append([i for i, _, _ in kept])
        embeds.append(torch.stack([e for _, e, _ in kept]))
        sizes.append([n for _, _, n in kept])
    return indices, embeds, sizes


@pytest.mark.parametrize("family", ["llava-llama", "idefics3"])
def test_dominant_set_is_the_top_k_of_the_towers_eager_attention(family, recorded):
    """CLIP: the class token's row; SigLIP-style (Idefics3): mean attention received, per pixel-shuffled token."""
    case = families()[family]
    model, inputs = case.build(), case.inputs(["a"])
    scores = eager_token_scores(family, model, inputs, "visionzip", {"keep": 0.5, "contextual": 0.25})  # (I, n)
    (ctx, out), n = recorded[0], recorded[0][0].embeds.shape[1]
    dominant, contextual = VisionZip(VisionZipConfig(keep=0.5, contextual=0.25)).split(ctx.keep)
    assert contextual > 0
    for s in range(scores.shape[0]):
        singles = set(out.index[s][out.size[s] == 1].tolist())
        assert set(scores[s].topk(dominant).indices.tolist()) <= singles
    assert out.index.shape == (scores.shape[0], ctx.keep) and int(out.size.sum()) == scores.shape[0] * n
    indices, embeds, sizes = reference(ctx, dominant, contextual)
    assert out.index.tolist() == indices and out.size.tolist() == sizes
    torch.testing.assert_close(out.embeds.float(), torch.stack(embeds), rtol=0, atol=1e-6)


def test_merge_flops_equal_the_counter_on_the_merge():
    torch.manual_seed(0)
    method = VisionZip(VisionZipConfig(keep=0.5, contextual=0.5))
    for n, keep in [(16, 8), (90, 13), (9, 2)]:
        signals = TowerSignals(-2, torch.rand(3, n), torch.randn(3, n, 12), True)
        ctx = PreLLMContext(torch.randn(3, n, 20), keep, signals)
        with FlopCounterMode(display=False) as counter:
            out = method.merge(ctx)
        assert counter.get_total_flops() == 3 * method.merge_flops(n, keep, 20) > 0
        assert bool((out.index[:, 1:] > out.index[:, :-1]).all()) and out.size.sum(dim=1).tolist() == [n] * 3
        torch.testing.assert_close(  # merged tokens carry their group's mass: sizes x embeds sum to the span's
            (out.embeds * out.size[..., None]).sum(dim=1), ctx.embeds.sum(dim=1), rtol=0, atol=1e-4
        )


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"keep": 0.5, "tokens": 8}, ValueError, "give one of keep, tokens or flops"),
        ({"tokens": 8, "flops": 0.5}, ValueError, "give one of keep, tokens or flops"),
        ({"keep": 0.0}, ValueError, r"keep must be in \(0, 1\]"),
        ({"tokens": 0}, ValueError, "tokens must be an int >= 1"),
        ({"tokens": 2.5}, TypeError, "tokens must be an int >= 1"),
        ({"contextual": 1.5}, ValueError, r"contextual .* must be in \[0, 1\]"),
    ],
)
def test_bad_options_raise_naming_the_valid_values(options, error, message):
    with pytest.raises(error, match=message):
        VisionZipConfig(**options)


def test_defaults_are_the_papers_64_of_576_with_10_contextual():
    config = VisionZipConfig()
    assert config.keep == 64 / 576 and config.contextual == 10 / 64 and config.tokens is None
    assert VisionZip(config).split(64) == (54, 10) and VisionZip(config).split(192) == (162, 30)

"""CDPruner specifics: the fast Cholesky greedy against an exhaustive MAP (one token) and a naive log-det greedy
(float64, one candidate at a time), the instruction's effect and padding, its FLOPs, exact ``tokens=N`` counts on
every family, the text a real model hands it, and option errors. (The VLM matrix covers the rest.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenprune
from tests.helpers.recording import record_merges
from tests.helpers.vlm_families import families
from tokenprune.methods.cdpruner import CDPruner, CDPrunerConfig, greedy_dpp, instruction_relevance
from tokenprune.methods.vlm import PreLLMContext


@pytest.fixture
def recorded(monkeypatch):
    """Every ``(context, reduction)`` pair cdpruner's merge sees and returns."""
    return record_merges(monkeypatch, CDPruner)


def method(**options) -> CDPruner:
    return CDPruner(CDPrunerConfig(**options))


def reference_kernel(x: torch.Tensor, text: torch.Tensor, theta: float | None, negate: bool) -> torch.Tensor:
    """The conditional kernel of one span ``x`` ``(n, C)`` and its instruction ``text`` ``(T, C)``, entry by entry
    in float64: mean cosine to the text, min-max normalised (eps 1e-6), quality ``r`` or ``exp(alpha r)``."""
    n = x.shape[0]
    unit = [v.double() / v.double().norm() for v in x]
    words = [t.double() / t.double().norm() for t in text]
    cosine = [sum(float(u @ w) for w in words) / len(words) for u in unit]
    cosine = [-c for c in cosine] if negate else cosine
    low, high = min(cosine), max(cosine)
    r = [(c - low + 1e-6) / (high - low + 1e-6) for c in cosine]
    q = r if theta is None else [math.exp(theta / (2 * (1 - theta)) * v) for v in r]
    return torch.tensor([[q[i] * float(unit[i] @ unit[j]) * q[j] for j in range(n)] for i in range(n)])


def logdet(kernel: torch.Tensor, subset: list[int]) -> float:
    return float(torch.logdet(kernel[subset][:, subset]))


def naive_greedy(kernel: torch.Tensor, keep: int) -> list[int]:
    """Greedy MAP one candidate at a time: each step adds the token maximising the log det of the kept set's kernel."""
    chosen: list[int] = []
    for _ in range(keep):
        rest = [i for i in range(kernel.shape[0]) if i not in chosen]
        chosen.append(max(rest, key=lambda i: logdet(kernel, chosen + [i])))
    return chosen


def context(x, keep, text, valid=None) -> PreLLMContext:
    valid = torch.ones(text.shape[:2], dtype=torch.bool) if valid is None else valid
    return PreLLMContext(x, keep, text=text, text_valid=valid)


@pytest.mark.parametrize("n", [3, 6, 8])
@pytest.mark.parametrize(("theta", "relevance"), [(None, "similar"), (0.5, "similar"), (None, "dissimilar")])
def test_one_token_is_the_exhaustive_map(n, theta, relevance):
    generator = torch.Generator().manual_seed(n)
    x, text = torch.randn(3, n, 12, generator=generator), torch.randn(3, 4, 12, generator=generator)
    out = method(theta=theta, relevance=relevance).merge(context(x, 1, text))
    for s in range(3):
        kernel = reference_kernel(x[s], text[s], theta, relevance == "dissimilar")
        best = max(range(n), key=lambda i: logdet(kernel, [i]))  # every 1-subset
        assert out.index[s].tolist() == [best]


@pytest.mark.parametrize("n", [2, 5, 8])
@pytest.mark.parametrize(("theta", "relevance"), [(None, "similar"), (0.5, "similar"), (0.9, "dissimilar")])
def test_fast_greedy_equals_the_naive_log_det_greedy(n, theta, relevance):
    generator = torch.Generator().manual_seed(10 + n)
    x, text = torch.randn(3, n, 12, generator=generator), torch.randn(3, 5, 12, generator=generator)
    config = method(theta=theta, relevance=relevance)
    for keep in range(1, n + 1):
        kernels = [reference_kernel(x[s], text[s], theta, relevance == "dissimilar") for s in range(3)]
        order = greedy_dpp(torch.stack(kernels), keep)  # the pick order, on the reference's own kernels
        assert order.tolist() == [naive_greedy(k, keep) for k in kernels], keep
        out = config.merge(context(x, keep, text))  # the method's own kernel: the same sets, in spatial order
        assert out.index.tolist() == [sorted(o) for o in order.tolist()]
        assert torch.equal(out.embeds, x.gather(1, out.index[..., None].expand(-1, -1, x.shape[-1])))
        assert torch.equal(out.size, torch.ones(3, keep))


def test_the_instruction_decides_and_padded_text_rows_do_not():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 16, generator=generator)
    picks = [method().merge(context(x, 1, x[:, [i]])).index.item() for i in (3, 5)]
    assert picks == [3, 5]  # a token the instruction copies is the most relevant: the first pick
    words = torch.randn(1, 2, 16, generator=generator)
    padded = torch.cat([words, 50 * torch.randn(1, 3, 16, generator=generator)], dim=1)  # (1, 5, C) junk rows
    valid = torch.tensor([[True, True, False, False, False]])
    relevance = instruction_relevance(x, words, torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(instruction_relevance(x, padded, valid), relevance)
    assert not torch.allclose(instruction_relevance(x, padded, torch.ones_like(valid)), relevance)  # rows count
    for keep in (1, 3, 6):
        alone = method().merge(context(x, keep, words)).index
        assert torch.equal(method().merge(context(x, keep, padded, valid)).index, alone)
    # No valid row (or no text at all): every token equally relevant, a similarity-only DPP (theta=0 is the same).
    none = method().merge(context(x, 4, padded, torch.zeros(1, 5, dtype=torch.bool))).index
    assert torch.equal(none, method().merge(PreLLMContext(x, 4)).index)
    assert torch.equal(none, method(theta=0.0).merge(context(x, 4, words)).index)


def test_exhausted_kernels_fill_by_relevance_and_never_repeat_a_token():
    """Six tokens in a plane (rank 2): after two picks no gain is left; the rest go by relevance, highest first."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [1.0, 0.1]])[None]  # (1, 6, 2)
    text = torch.tensor([[[1.0, 0.2]]])
    kernel = reference_kernel(x[0], text[0], None, False)
    order = greedy_dpp(kernel[None], 5)[0].tolist()
    assert order[:2] == naive_greedy(kernel, 2)
    rest = sorted(set(range(6)) - set(order[:2]), key=lambda i: -float(kernel[i, i]))
    assert order[2:] == rest[:3] and len(set(order)) == 5
    assert method().merge(context(x, 5, text)).index[0].tolist() == sorted(order)


def test_merge_flops_equal_the_counter_whatever_the_prompt_length():
    for n, keep, channels in [(20, 7, 12), (9, 1, 5), (9, 2, 5), (16, 16, 8)]:
        counts = set()
        for t in (0, 1, 9):
            ctx = context(torch.randn(4, n, channels), keep, torch.randn(4, t, channels))
            with FlopCounterMode(display=False) as counter:
                method().merge(ctx)
            counts.add(counter.get_total_flops())
        expected = 2 * n * n * channels + 2 * n * channels + n * (keep - 1) * (keep - 2)
        assert counts == {4 * method().merge_flops(n, keep, channels)} == {4 * expected}


def test_the_text_it_reads_is_the_models_input_embeddings_of_each_prompts_instruction(recorded):
    case = families()["llava-llama"]
    model = case.build()
    embed = model.get_input_embeddings()
    image = case.visual_ids[0]
    after = {n: case.samples[n][len(case.samples[n]) - case.samples[n][::-1].index(image) :] for n in ("a", "b")}
    assert after == {"a": [7, 8, 9, 10], "b": [12, 13, 14, 15, 16, 17]}
    patch = tokenprune.apply(model, "cdpruner", tokens=4)
    chosen = {}
    with torch.no_grad():
        for names in (["a"], ["b"], ["a", "b"]):
            recorded.clear()
            model(**case.inputs(names))  # the pair: left-padded, both 16-token images in one call (S = 2)
            ((ctx, out),) = recorded
            assert ctx.text.shape[0] == len(names) == ctx.embeds.shape[0]
            after_of = [after[name] for name in names]
            for s, name in enumerate(names):
                # The valid rows, in order (where the padding rows sit is the reducer's business: masked here).
                assert int(ctx.text_valid[s].sum()) == len(after[name]) and ctx.text.shape[1] == max(map(len, after_of))
                assert torch.equal(ctx.text[s][ctx.text_valid[s]], embed(torch.tensor(after[name])))  # (T_s, C)
            chosen[tuple(names)] = out.index.tolist()
    assert chosen[("a", "b")] == chosen[("a",)] + chosen[("b",)]  # each span chose with its own instruction
    assert chosen[("a",)] != chosen[("b",)]
    patch.remove()


def test_defaults_and_bad_options():
    config = CDPrunerConfig()
    assert config.keep == 64 / 576 and config.tokens is None and config.theta is None
    assert (config.relevance, config.merge_positions) == ("similar", "original")
    assert method(tokens=8).merged_count(20, 0.0) == 8 and method(tokens=8).merged_count(6, 0.0) == 6
    assert method().merged_count(576, CDPrunerConfig().keep) == 64
    assert CDPrunerConfig(theta=0).theta == 0.0
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=r"None or a number in \[0, 1\)"):
            CDPrunerConfig(theta=bad)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match=r"None or a number in \[0, 1\)"):
            CDPrunerConfig(theta=bad)
    with pytest.raises(ValueError, match="'similar' or 'dissimilar'"):
        CDPrunerConfig(relevance="negative")
    with pytest.raises(ValueError, match="'original' or 'compact'"):
        CDPrunerConfig(merge_positions="spatial")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        CDPrunerConfig(keep=0)
    with pytest.raises(TypeError, match="int >= 1"):
        CDPrunerConfig(tokens=2.5)
    with pytest.raises(ValueError, match="one of keep, tokens or flops"):
        CDPrunerConfig(keep=0.5, tokens=8)

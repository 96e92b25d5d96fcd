"""SparseVLM: raters, rater-attention scores, per-layer counts, recycling and budgets, against references
computed here independently (float64, loops, HF's own eager attention map, hooks on the original layers).

The shared properties (zero reduction bit-exact, undo, batches, sdpa == eager, caches, FLOPs == the counter) run
in ``tests/test_vlm_matrix.py -k sparsevlm``.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import families
from tokenprune.methods.sparsevlm import SparseVLM, SparseVLMConfig


def case_and_model(name: str = "llava-llama", attn: str = "sdpa"):
    case = families()[name]
    return case, case.build(attn)


def record(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    """Every ``(args, result)`` of ``SparseVLM.<name>`` from now on."""
    seen, original = [], getattr(SparseVLM, name)

    def recording(self, *args):
        out = original(self, *args)
        seen.append((args, out))
        return out

    monkeypatch.setattr(SparseVLM, name, recording)
    return seen


def layers_of(patch) -> list:
    return [wrapper.base_layer for wrapper in patch.adapter.language_model.layers]


def capture_io(layer: torch.nn.Module, inputs: list, outputs: list) -> list:
    """Hooks recording the hidden states a decoder layer reads and the ones it returns."""

    def before(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def after(module, args, kwargs, out):
        outputs.append((out[0] if isinstance(out, tuple) else out).detach().clone())

    return [
        layer.register_forward_pre_hook(before, with_kwargs=True),
        layer.register_forward_hook(after, with_kwargs=True),
    ]


def naive_raters(embeds: torch.Tensor, ids: list[int], visual_ids: tuple[int, ...]) -> set[int]:
    """Input positions of the raters: text after the first image whose mean softmax relevance is above the mean."""
    first = min(i for i, t in enumerate(ids) if t in visual_ids)
    visual = [i for i, t in enumerate(ids) if t in visual_ids]
    text = [i for i, t in enumerate(ids) if t not in visual_ids and i > first]
    x = embeds.double()
    relevance = []
    for t in text:
        total = 0.0
        for v in visual:
            logits = [float(x[v] @ x[u]) for u in text]
            top = max(logits)
            total += math.exp(float(x[v] @ x[t]) - top) / sum(math.exp(g - top) for g in logits)
        relevance.append(total / len(visual))
    mean = sum(relevance) / len(relevance)
    return {t for t, r in zip(text, relevance, strict=True) if r > mean}


def naive_density_peaks(x: torch.Tensor, k: int) -> list[list[int]]:
    """The clusters (sorted member lists) of DPC-kNN as their code writes it: direct distances, float64."""
    x = x.double()
    n, channels = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(channels) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]
    biggest = max(max(row) for row in dist)
    score = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        score.append(min(denser, default=biggest) * density[i])
    centres = sorted(range(n), key=lambda i: -score[i])[:k]
    clusters = {c: [] for c in centres}
    for i in range(n):
        nearest = i if i in clusters else min(centres, key=lambda c: dist[i][c])
        clusters[nearest].append(i)
    return sorted(sorted(members) for members in clusters.values())


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"retain": 100}, ValueError, r"retain must be one of \[64, 96, 128, 192\]"),
        ({"retain": 64, "ratio": 0.5}, ValueError, "give one of retain, ratio or flops"),
        ({"ratio": 0.5, "flops": 0.5}, ValueError, "give one of retain, ratio or flops"),
        ({"ratio": 1.5}, ValueError, r"ratio must be in \[0, 1\]"),
        ({"layers": [3, 2, 5]}, ValueError, "strictly increasing"),
        ({"layers": [-1, 2, 5]}, ValueError, "strictly increasing"),
        ({"layers": "2"}, TypeError, "list of ints"),
        ({"layers": [1.0]}, TypeError, "list of ints"),
        ({"retain": 64, "layers": [1, 2]}, ValueError, "has 3 stages; give that many layers"),
        ({"recycle": -0.1}, ValueError, r"recycle must be in \[0, 1\]"),
        ({"clusters": 0}, ValueError, r"clusters must be in \(0, 1\]"),
        ({"flops": 0}, ValueError, r"flops .* must be in \(0, 1\]"),
    ],
)
def test_bad_options_raise_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        SparseVLMConfig.from_dict(options)


def test_layers_beyond_the_depth_are_refused():
    _, model = case_and_model()
    with pytest.raises(ValueError, match=r"out of range for a language model of 4 layers: .* 0 \.\. 2"):
        tokenprune.apply(model, "sparsevlm", ratio=0.5, layers=[1, 3])


# ----------------------------------------------------------------------------- per-layer counts
def test_released_schedule_on_llava_1_5_counts_as_their_code():
    """retain=192 on 32 layers and 576 tokens: 300 / 200 / 110 selected after layers 2 / 6 / 15, plus the recycled
    clusters of the top 30% (+1) pruned, one per ten (+1): 276 pruned -> 83 -> 9, 109 -> 33 -> 4, 94 -> 29 -> 3."""
    plan = SparseVLM(SparseVLMConfig(retain=192)).plan_for(32)
    assert plan.visual_counts(576) == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert plan.recycled_counts(576) == [0] * 3 + [9] + [0] * 3 + [4] + [0] * 8 + [3] + [0] * 15
    for retain, kept in {128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}.items():
        plan = SparseVLM(SparseVLMConfig(retain=retain, recycle=0.0)).plan_for(32)  # no recycling: their counts
        assert plan.visual_counts(576) == [576] * 3 + [kept[0]] * 4 + [kept[1]] * 9 + [kept[2]] * 16
        assert plan.recycle is None


@pytest.mark.parametrize(
    ("depth", "layers"),
    [(32, (2, 6, 15)), (28, (2, 5, 13)), (40, (2, 8, 19)), (8, (1, 2, 4)), (5, (1, 2, 3)), (4, (0, 1, 2))],
)
def test_default_pruning_layers_scale_with_the_depth(depth, layers):
    assert SparseVLM(SparseVLMConfig()).pruning_layers(depth) == layers


def test_geometric_ratio_and_the_counts_the_model_runs():
    """ratio=0.5 on 16 visual tokens, stages after layers 0, 1, 2: 8 kept + 1 recycled (8 pruned -> 3 candidates
    -> 1 cluster), then 4 + 1 of 9, then 2 + 1 of 5; the model runs exactly these counts."""
    case, model = case_and_model()
    patch = tokenprune.apply(model, "sparsevlm", ratio=0.5)
    with torch.no_grad():
        model(**case.inputs(["a"]))
    assert patch.state.visual_per_layer() == [[16], [9], [5], [3]]
    assert patch.state.recycled_list == [[0], [1], [1], [1]]
    assert patch.runtime.method.plan_for(4).visual_counts(16) == [16, 9, 5, 3]


# ----------------------------------------------------------------------------- raters and scores
def test_raters_and_scores_equal_a_naive_reference(monkeypatch):
    """Raters from the layer-0 input embeddings (float64 loops); scores: HF's eager attention map at the pruning
    layer, averaged over heads and raters."""
    case, model = case_and_model(attn="eager")
    raters, scores = record(monkeypatch, "raters"), record(monkeypatch, "importance")
    patch = tokenprune.apply(model, "sparsevlm", ratio=0.5, layers=[1])
    embeds, _, maps, handles = [], [], [], []
    handles += capture_io(layers_of(patch)[0], embeds, [])
    attn = layers_of(patch)[1].self_attn
    handles.append(attn.register_forward_hook(lambda m, a, out: maps.append(out[1].detach().double())))
    ids = case.samples["a"]
    with torch.no_grad():
        model(**case.inputs(["a"]))
    for handle in handles:
        handle.remove()
    index = patch.state.index_in[1][0].tolist()  # every token enters layer 1
    expected = naive_raters(embeds[0][0], ids, case.visual_ids)
    (_, mask), (_, score) = raters[0], scores[0]
    assert {index[j] for j in mask[0].nonzero().flatten().tolist()} == expected
    attention = maps[0][0].mean(dim=0)  # (N, N) head-averaged
    reference = attention[sorted(expected)].mean(dim=0)
    visual = [j for j, position in enumerate(index) if ids[position] in case.visual_ids]
    torch.testing.assert_close(score[0, visual].double(), reference[visual], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- recycling
@pytest.mark.parametrize("name", ["llava-llama", "qwen2-vl"])
def test_recycled_tokens_hold_exactly_the_pruned_ones(monkeypatch, name):
    """With recycle=1.0 every pruned token is recycled: sizes sum to the input; each recycled token's hidden
    state is the mean of its members' (the removing layer's output, captured by a hook), its members are the
    pruned tokens of DPC-kNN's clusters, and it is stored at a member's slot with that slot's position."""
    case, model = case_and_model(name)
    scores = record(monkeypatch, "importance")
    options = {"ratio": 0.5, "layers": [1], "recycle": 1.0, "clusters": 0.3}
    patch = tokenprune.apply(model, "sparsevlm", **case.options_for(SparseVLMConfig, options))
    produced, read = [], []
    handles = capture_io(layers_of(patch)[1], [], produced) + capture_io(layers_of(patch)[2], read, [])
    ids = case.samples["a"]
    with torch.no_grad():
        model(**case.inputs(["a"]))
    for handle in handles:
        handle.remove()
    state = patch.state
    before, after = state.index_in[1][0].tolist(), state.index_in[2][0].tolist()
    source = state.source[0].tolist()
    assert float(state.size[0].sum()) == len(ids) and all(s in after for s in source)  # nothing dropped
    visual = [j for j, p in enumerate(before) if ids[p] in case.visual_ids]
    kept_count = state.targets_list[2][0] - state.recycled_list[2][0]
    order = sorted(visual, key=lambda j: -float(scores[0][1][0, j]))
    kept, pruned = {before[j] for j in order[:kept_count]}, sorted(before[j] for j in order[kept_count:])
    clusters = []
    for slot, position in enumerate(after):
        members = [q for q, s in enumerate(source) if s == position]
        assert state.size[0, slot] == len(members)
        member_slots = [before.index(q) for q in members]
        if position not in kept and ids[position] in case.visual_ids:
            clusters.append(members)
            assert position in members and set(members) <= set(pruned)
            expected = produced[0][0, member_slots].double().mean(dim=0)
            torch.testing.assert_close(read[0][0, slot].double(), expected, rtol=0, atol=1e-6)
        else:
            assert members == [position]
            assert torch.equal(read[0][0, slot], produced[0][0, before.index(position)])
    assert sorted(sum(clusters, [])) == pruned and len(clusters) == state.recycled_list[2][0] == 3
    x = produced[0][0, [before.index(q) for q in pruned]]
    assert sorted(sorted(c) for c in clusters) == [[pruned[i] for i in c] for c in naive_density_peaks(x, 3)]


def test_default_recycling_takes_the_most_attended_pruned_tokens(monkeypatch):
    """recycle=0.3: the recycled tokens hold the top 30% (+1) pruned tokens by rater attention, the others are
    dropped (their sources stay their own, absent from the later layers)."""
    case, model = case_and_model("idefics3")  # 48 visual tokens: 24 pruned -> 8 candidates -> 1 cluster
    scores = record(monkeypatch, "importance")
    patch = tokenprune.apply(model, "sparsevlm", ratio=0.5, layers=[1])
    ids = case.samples["a"]
    with torch.no_grad():
        model(**case.inputs(["a"]))
    state = patch.state
    before, after, source = state.index_in[1][0].tolist(), state.index_in[2][0].tolist(), state.source[0].tolist()
    visual = [j for j, p in enumerate(before) if p >= 0 and ids[p] in case.visual_ids]
    order = sorted(visual, key=lambda j: -float(scores[0][1][0, j]))
    assert len(visual) == 48 and state.recycled_list[2] == [1]
    pruned = order[24:]
    candidates = {before[j] for j in pruned[:8]}
    recycled = [p for p in after if sum(s == p for s in source) > 1]
    assert len(recycled) == 1 and {q for q, s in enumerate(source) if s == recycled[0]} == candidates
    for j in pruned[8:]:
        assert source[before[j]] == before[j] and before[j] not in after


def test_a_recycle_that_breaks_the_contract_is_refused(monkeypatch):
    case, model = case_and_model()
    original = SparseVLM.recycle

    def one_too_few(self, ctx, scores, keep, counts):
        group, stored, hidden = original(self, ctx, scores, keep, counts)
        return group.masked_fill(group == 0, -1), stored.masked_fill(stored >= 0, -1), hidden

    monkeypatch.setattr(SparseVLM, "recycle", one_too_few)
    tokenprune.apply(model, "sparsevlm", ratio=0.5)
    with pytest.raises(RuntimeError, match="recycle\\(\\) must merge only pruned visual tokens"):
        with torch.no_grad():
            model(**case.inputs(["a"]))


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_flops_budgets_land(budget):
    """flops= solves the geometric ratio per prompt: the measured LLM prefill FLOPs (scoring, raters and
    clustering included) land within 0.03 of the budget, and the analytic table is what torch counts."""
    case, model = case_and_model("idefics3")
    x = case.inputs(["a"])
    full = sum(row["flops"] for row in tokenprune.count_flops(model, x).layers)
    patch = tokenprune.apply(model, "sparsevlm", flops=budget)
    report = tokenprune.count_flops(model, x)
    assert abs(sum(row["flops"] for row in report.layers) / full - budget) < 0.03
    assert report.analytic == pytest.approx(report.measured, rel=1e-9)
    assert patch.state.reduced and patch.state.recycled_list is not None
    patch.remove()


def test_a_budget_below_the_reach_is_refused():
    case, model = case_and_model()
    tokenprune.apply(model, "sparsevlm", flops=0.05)
    with pytest.raises(ValueError, match="flops budget 0.05 is below what 'sparsevlm' reaches"):
        with torch.no_grad():
            model(**case.inputs(["a"]))

"""Qwen3-VL / Qwen3-VL-MoE (transformers 5.x): DeepStack features follow merged and pruned visual tokens.

Tiny random-weight models of ``tests/helpers/vlm_families.py`` (vision depth 2 with DeepStack from both tower
layers: two levels, added after LLM layers 0 and 1; an image of 16 tokens and a video of 3 slices of 8, each
slice after its timestamp token). The reference is built here, independently of the reducer's code: HF's own
text-model inputs of the unpatched model (recorded at its entry), merged groups as mean embeddings and mean
DeepStack rows, then the unpatched decoder layers run by hand on the tokens the state keeps, each DeepStack level
added to the visual tokens present after its layer. What every method has on every family (zero reduction
bit-exact, remove(), batches, generate, FLOPs) is in test_vlm_matrix.
"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import QWEN3_STAMP, QWEN_START, families

CASES = ["qwen3-vl", "qwen3-vl-moe"]
MERGE = {"merge_keep": 0.5, "merge_positions": "original"}
REDUCING = {
    "merge only": ("aim", {**MERGE, "prune_start": 1.0, "prune_end": 1.0}),
    "prune after layer 0": ("fastv", {"k": 1, "keep": 0.5}),
    "merge, then prune after layers 0-2": ("aim", {**MERGE, "prune_start": 0.0, "prune_end": 1.0}),  # 3/4, 1/2, 1/4
}


def text_model_inputs(model, x: dict) -> dict:
    """The keyword arguments HF's inner model gives the (unpatched) text model for inputs ``x``."""
    seen: dict = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    with torch.no_grad():
        model(**x)
    handle.remove()
    return seen


def dense_levels(hf: dict) -> list[torch.Tensor]:
    """Every DeepStack level ``(L, C)`` per input position of sample 0 (zeros at text positions)."""
    visual = hf["visual_pos_masks"][0]
    levels = []
    for level in hf["deepstack_visual_embeds"]:
        dense = level.new_zeros(visual.shape[0], level.shape[-1])
        dense[visual] = level
        levels.append(dense)
    return levels


def group_means(values: torch.Tensor, source: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(K, C)``: for every kept input position, the mean of ``values`` ``(L, C)`` over the positions it holds."""
    return torch.stack([values[source == p].mean(dim=0) for p in kept.tolist()])


def causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def reference_logits(model, hf: dict, state, own_rows: bool = False) -> torch.Tensor:
    """The unpatched layers by hand on sample 0's kept tokens (``state.index_in``), DeepStack at the visual ones.

    A merged token enters with the mean embedding of the tokens it holds (``state.source``) and carries the mean
    of their DeepStack rows (``own_rows``: its own position's rows instead, the wrong choice).
    """
    lm = model.model.language_model
    source, entering = state.source[0], state.index_in[0][0]
    visual = hf["visual_pos_masks"][0]
    h = group_means(hf["inputs_embeds"][0], source, entering)[None]  # (1, K, C)
    stacks = [
        d if own_rows else torch.zeros_like(d).index_copy(0, entering, group_means(d, source, entering))
        for d in dense_levels(hf)
    ]  # per level (L, C), rows at the entering positions
    cos, sin = lm.rotary_emb(h, hf["position_ids"])  # the full prompt's (1, L, D) at its 3-axis positions
    with torch.no_grad():
        for layer, decoder in enumerate(lm.layers):
            index = state.index_in[layer][0]
            if layer:  # the tokens removed after the previous layer are gone
                h = h[:, torch.searchsorted(state.index_in[layer - 1][0], index)]
            rotary = (cos[:, index], sin[:, index])
            h = decoder(h, attention_mask=causal(len(index)), position_embeddings=rotary, position_ids=None)
            if layer < len(stacks):  # level ``layer`` after the layer (on tokens removed next too: they go anyway)
                rows = visual[index]
                h = h.clone()
                h[0, rows] = h[0, rows] + stacks[layer][index][rows]
        return model.lm_head(lm.norm(h[:, torch.searchsorted(state.index_in[-1][0], state.index[0])]))


def run(case: str, names: list[str], method: str, options: dict):
    """(model, the unpatched text-model inputs, patched logits, state) of one reducing forward; unpatched after."""
    c = families()[case]
    model, x = c.build(), c.inputs(names)
    hf = text_model_inputs(model, x)
    patch = tokenprune.apply(model, method, **options)
    with torch.no_grad():
        logits = model(**x).logits
    state = patch.state
    patch.remove()
    return model, hf, logits, state


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", list(REDUCING))
def test_deepstack_follows_merged_and_pruned_tokens(case, reduction):
    """Image + video: the patched logits == the unpatched layers run by hand with the expected DeepStack rows."""
    method, options = REDUCING[reduction]
    model, hf, logits, state = run(case, ["mixed"], method, options)
    assert state.reduced and len(hf["deepstack_visual_embeds"]) == 2
    visual = int(hf["visual_pos_masks"].sum())
    if options.get("merge_keep"):
        assert state.visual_in[0].item() == visual // 2  # every span halved before the LLM
    if reduction != "merge only":
        assert state.visual_in[1].item() < state.visual_in[0].item()  # removed before the second DeepStack level
    expected = reference_logits(model, hf, state)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    # The DeepStack rows matter: without them, or (merging) with a merged token's own rows, the logits differ.
    none = dict(hf, deepstack_visual_embeds=[torch.zeros_like(level) for level in hf["deepstack_visual_embeds"]])
    assert (reference_logits(model, none, state) - logits).abs().max() > 1e-3
    if options.get("merge_keep"):
        assert (reference_logits(model, hf, state, own_rows=True) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_merged_deepstack_rows_are_group_means_of_their_frame(case):
    """What the text model receives after merging: embeddings and DeepStack rows of every kept token are the means
    of the tokens it holds, groups never straddle an image or a video slice; the visual mask is the compact one."""
    c = families()[case]
    model, x = c.build(), c.inputs(["mixed"])
    hf = text_model_inputs(model, x)
    patch = tokenprune.apply(model, "aim", **MERGE, prune_start=1.0, prune_end=1.0)
    got = text_model_inputs(model, x)  # recorded after the reducer's and the adapter's entry hooks
    state = patch.state
    patch.remove()
    ids = x["input_ids"][0]
    runs = torch.cumsum((ids == QWEN_START).long(), 0) * (hf["visual_pos_masks"][0]).long()  # run id, 0: not visual
    source, kept = state.source[0], state.index[0]
    assert all(len(set(runs[source == p].tolist())) == 1 for p in kept.tolist())  # one image or one slice each
    assert max(int((source == p).sum()) for p in kept.tolist()) > 1  # some tokens do stand for several
    assert state.spans[0] == [16, 8, 8, 8]
    stamps = [i for i, t in enumerate(ids.tolist()) if QWEN3_STAMP <= t < QWEN3_STAMP + 3]
    assert len(stamps) == 3 and set(stamps) <= set(kept.tolist())  # timestamps are text: kept
    torch.testing.assert_close(
        got["inputs_embeds"][0], group_means(hf["inputs_embeds"][0], source, kept), rtol=0, atol=1e-5
    )
    compact_visual = hf["visual_pos_masks"][0][kept]
    assert torch.equal(got["visual_pos_masks"][0], compact_visual)
    for level, dense in zip(got["deepstack_visual_embeds"], dense_levels(hf), strict=True):
        expected = group_means(dense, source, kept)  # (K, C)
        torch.testing.assert_close(level[0, kept][compact_visual], expected[compact_visual], rtol=0, atol=1e-6)
    positions = got["position_ids"]
    assert torch.equal(positions, hf["position_ids"][:, :, kept])  # every axis: the original position


@pytest.mark.parametrize("reduction", ["merge, then prune after layers 0-2", "prune after layer 0"])
def test_prefill_and_decode_positions_are_the_original_ones(reduction):
    """Every layer's (cos, sin) in the prefill are the unpatched ones at the kept tokens; every decode step of
    ``generate()`` (4-row positions) gets the very (cos, sin) the unpatched model uses."""
    method, options = REDUCING[reduction]
    c = families()["qwen3-vl"]
    model, x = c.build(), c.inputs(["video"])

    def record(model) -> list[list[tuple]]:
        calls = [[] for _ in model.model.language_model.layers]
        layers = model.model.language_model.layers
        handles = [
            getattr(layer, "base_layer", layer).register_forward_pre_hook(
                lambda m, a, k, i=i: calls[i].append(k["position_embeddings"]), with_kwargs=True
            )
            for i, layer in enumerate(layers)
        ]
        with torch.no_grad():
            c.greedy(model, x, 4)
        for handle in handles:
            handle.remove()
        return calls

    unpatched = record(model)
    patch = tokenprune.apply(model, method, **options)
    patched = record(model)
    state = patch.state
    assert state.reduced and state.generated == 3
    for layer, (full, reduced) in enumerate(zip(unpatched, patched, strict=True)):
        index = state.index_in[layer][0]
        assert all(torch.equal(f[:, index], r) for f, r in zip(full[0], reduced[0], strict=True)), layer
        for step, (f, r) in enumerate(zip(full[1:], reduced[1:], strict=True)):
            assert all(torch.equal(a, b) for a, b in zip(f, r, strict=True)), (layer, step)
    patch.remove()


def test_tower_signals_are_mean_attention_received_per_token():
    """visionzip's tower signal: per LLM token, the mean over its 2x2 patches of the attention each patch receives
    within its own frame (heads and queries averaged), from the tower block's queries and keys, rotated by hand."""
    c = families()["qwen3-vl"]
    model, x = c.build(), c.inputs(["mixed"])
    attn = model.model.visual.blocks[0].attn
    calls: list[tuple] = []  # per tower run (images, then videos): the attention's input, its (cos, sin)
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: calls.append((a[0], k["position_embeddings"])), with_kwargs=True
    )
    patch = tokenprune.apply(model, "visionzip", keep=0.5, layer=0)
    found: list = []
    original = patch.adapter.tower_sequence
    patch.adapter.tower_sequence = lambda f, runs: found.append(original(f, runs)) or found[-1]
    with torch.no_grad():
        model(**x)
    handle.remove()
    patch.remove()
    expected = []
    for (hidden, (cos, sin)), grid in zip(calls, [x["image_grid_thw"], x["video_grid_thw"]], strict=True):
        t, h, w = grid[0].tolist()
        with torch.no_grad():
            q, k, _ = attn.qkv(hidden).unflatten(-1, (3, attn.num_heads, -1)).unbind(1)  # (S, H, D) each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        for f in range(t):  # attention runs per frame
            frame = slice(f * h * w, (f + 1) * h * w)
            weights = torch.einsum("phd,qhd->hpq", q[frame], k[frame]).mul(attn.scaling).softmax(-1)  # (H, P, P)
            expected.append(weights.mean(dim=(0, 1)).view(-1, 4).mean(dim=1))  # received per patch, per token
    sequence = found[-1]
    visual = (x["input_ids"] == 199) | (x["input_ids"] == 198)
    assert not sequence.from_class_token and len(calls) == 2
    torch.testing.assert_close(sequence.attention[visual], torch.cat(expected), rtol=0, atol=1e-6)
    assert not torch.equal(sequence.attention[visual], sequence.attention[visual].mean().expand(visual.sum()))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(S, H, D)`` by ``cos``/``sin`` ``(S, D)`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def test_an_unknown_layout_is_refused_naming_the_attribute():
    model = families()["qwen3-vl"].build()
    del model.model.visual.deepstack_merger_list
    with pytest.raises(TypeError, match="deepstack_merger_list"):
        tokenprune.apply(model, "fastv", k=1, keep=0.5)

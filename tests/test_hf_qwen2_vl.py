"""Qwen2-VL (transformers 5.x) with ``fastv`` and ``aim``: visual tokens removed for real, M-RoPE positions kept.

Tiny random-weight model built from a config (vision depth 1, embed 32, patch 14, spatial merge 2: an 8x8-patch
image gives 16 visual tokens, a 4x8 one 8; text hidden 64, 4 layers, GQA 4/2 heads, head_dim 16, mrope_section
[2, 3, 3], vocab 200): nothing is downloaded. Exactness first (zero reduction == unpatched, remove() restores),
then the removal against an independent reference: the unpatched layers run by hand on the kept tokens at the
3-axis positions the model's own ``get_rope_index`` gives them, prefill and every decode step of ``generate()``.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import tokenprune

IMG, VID, VSTART, VEND, PAD = 199, 198, 197, 196, 0
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
ZERO = {"fastv": {"keep": 1.0}, "aim": {"merge_keep": 1.0, "prune_start": 1.0, "prune_end": 1.0}}
REDUCING = {
    "fastv": {"k": 2, "keep": 0.5},
    "aim": {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75, "merge_positions": "original"},
}
# One 16-token image + 8 text tokens: visual tokens entering each of the 4 layers, and sequence lengths.
EXPECTED_VISUAL = {"fastv": [16, 16, 8, 8], "aim": [8, 8, 4, 0]}
EXPECTED_TOKENS = {"fastv": [24, 24, 16, 16], "aim": [16, 16, 12, 8]}


def build(attn: str = "sdpa", family: str = "qwen2") -> hf.Qwen2VLForConditionalGeneration:
    """A fresh eval-mode tiny Qwen2-VL (``family="qwen2.5"``: Qwen2.5-VL, windowed vision attention)."""
    torch.manual_seed(0)
    vision = {"depth": 1, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2":
        config_cls, model_cls = hf.Qwen2VLConfig, hf.Qwen2VLForConditionalGeneration
        vision |= {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    else:
        config_cls, model_cls = hf.Qwen2_5_VLConfig, hf.Qwen2_5_VLForConditionalGeneration
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "window_size": 56}
        vision |= {"fullatt_block_indexes": [0]}
        if family == "qwen2.5-windows":  # a windowed block after the full one: 8x8 patches -> 3x3 windows
            vision |= {"depth": 2, "fullatt_block_indexes": [0], "window_size": 84}
    config = config_cls(
        vision_config=vision,
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 200,
            "max_position_embeddings": 256,
            "initializer_range": 0.1,  # peaky attention: rankings far from ties
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    return model


def prompt(
    before: list[int], after: list[int], grids: list[tuple[int, int, int]], tokens: list[int] | None = None
) -> list[int]:
    """Text, then one image per grid (``tokens``: the placeholder id of each, default IMG), then text."""
    ids = list(before)
    for (t, h, w), token in zip(grids, tokens or [IMG] * len(grids), strict=True):
        ids += [VSTART] + [token] * (t * h * w // 4) + [VEND]
    return ids + list(after)


GRIDS = [[(1, 8, 8)], [(1, 4, 8)]]  # 16 and 8 visual tokens (the second not square: h and w axes differ)
PROMPTS = [prompt([1, 5], [7, 8, 9, 10], GRIDS[0]), prompt([1, 11, 4], [12, 13, 14, 15, 16, 17], GRIDS[1])]


def pixels(grids: list[tuple[int, int, int]], seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def padded(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, L)``: ``prompts`` padded with PAD on ``side``."""
    width = max(map(len, prompts))
    ids, mask = [], []
    for p in prompts:
        pad = [PAD] * (width - len(p))
        ids.append(pad + p if side == "left" else p + pad)
        mask.append([0] * len(pad) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)


def inputs(samples: list[int], side: str = "left") -> dict:
    """Padded inputs for ``PROMPTS[i]`` of ``samples`` (each with its own image)."""
    ids, mask = padded([PROMPTS[i] for i in samples], side)
    grids = [g for i in samples for g in GRIDS[i]]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMG).int(),
        "pixel_values": torch.cat([pixels(GRIDS[i], seed=i + 1) for i in samples]),
        "image_grid_thw": torch.tensor(grids),
    }


def greedy(model, kwargs: dict, steps: int = 5, **extra):
    return model.generate(**kwargs, max_new_tokens=steps, do_sample=False, **extra)


def rope_positions(model, kwargs: dict) -> torch.Tensor:
    """``(3, B, L)`` the model's own M-RoPE positions of the prompt (images and/or videos)."""
    grids = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    positions, _ = model.model.get_rope_index(
        kwargs["input_ids"],
        mm_token_type_ids=kwargs["mm_token_type_ids"],
        attention_mask=kwargs.get("attention_mask"),
        **{key: kwargs[key] for key in grids if kwargs.get(key) is not None},
    )
    return positions


# ----------------------------------------------------------------------------- exactness first
@pytest.mark.parametrize("family", ["qwen2", "qwen2.5"])
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_zero_reduction_is_bit_exact(method, family):
    model = build(family=family)
    x = inputs([0, 1])
    with torch.no_grad():
        expected = model(**x).logits
        expected_tokens = greedy(model, x)
        patch = tokenprune.apply(model, method, **ZERO[method])
        got = model(**x).logits
        tokens = greedy(model, x)
    assert torch.equal(got, expected) and torch.equal(tokens, expected_tokens)
    width = max(map(len, PROMPTS))
    assert patch.state.tokens_per_layer() == [(width, width)] * 4 and not patch.state.reduced


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_remove_restores_modules_and_outputs(method):
    model = build()
    x = inputs([0])
    module_types = [(name, type(m)) for name, m in model.named_modules()]
    with torch.no_grad():
        expected = model(**x).logits
        expected_tokens = greedy(model, x)
        hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
        patch = tokenprune.apply(model, method, **REDUCING[method])
        assert type(patch.adapter).__name__ == "Qwen2VLAdapter"
        reduced = model(**x).logits
        greedy(model, x)
        with tokenprune.disabled(model):
            assert torch.equal(model(**x).logits, expected)
        assert patch.remove() is model
        restored = model(**x).logits
        restored_tokens = greedy(model, x)
    assert reduced.shape[1] < expected.shape[1]
    assert torch.equal(restored, expected) and torch.equal(restored_tokens, expected_tokens)
    assert [(name, type(m)) for name, m in model.named_modules()] == module_types
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


# ----------------------------------------------------------------------------- schedule and positions
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_sequence_and_cache_lengths_follow_the_schedule(method):
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        out = model(**inputs([0]))
    state, lengths = patch.state, EXPECTED_TOKENS[method]
    assert state.visual_per_layer() == [[v] for v in EXPECTED_VISUAL[method]]
    assert [n for n, _ in state.tokens_per_layer()] == lengths
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == lengths
    text = [i for i, t in enumerate(PROMPTS[0]) if t != IMG]
    index = state.index[0].tolist()
    assert [i for i in index if PROMPTS[0][i] != IMG] == text and index == sorted(index)


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_kept_tokens_keep_their_original_3axis_positions(method):
    """Every layer's (cos, sin) are the rotary embedding of get_rope_index's positions of the tokens it sees."""
    model = build()
    x = inputs([0, 1])
    lm = model.model.language_model
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_embeddings"]), with_kwargs=True)
        for layer in lm.layers
    ]
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        model(**x)
    for handle in handles:
        handle.remove()
    positions = rope_positions(model, x)  # (3, B, L)
    for layer, index in enumerate(patch.state.index_in):
        gathered = positions.gather(-1, index.clamp(min=0).expand(3, *index.shape))  # (3, B, N_l)
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), gathered)
        valid = (index >= 0)[..., None]
        assert torch.equal(torch.where(valid, seen[layer][0], 0), torch.where(valid, cos, 0)), layer
        assert torch.equal(torch.where(valid, seen[layer][1], 0), torch.where(valid, sin, 0)), layer
    assert patch.state.reduced


def _by_hand(model, embeds: torch.Tensor, positions: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
    """The original layers on ``slots[l]`` (indices into ``embeds`` ``(1, N, C)``) at ``positions`` ``(3, 1, N)``."""
    lm = model.model.language_model
    hidden, current = embeds, torch.arange(embeds.shape[1])
    with torch.no_grad():
        for layer, block in enumerate(lm.layers):
            block = getattr(block, "base_layer", block)
            hidden = hidden[:, torch.searchsorted(current, slots[layer])]
            current = slots[layer]
            n = len(current)
            causal = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            pe = lm.rotary_emb(hidden, positions[..., current])
            hidden = block(hidden, attention_mask=causal, position_embeddings=pe)
        return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize(
    "attn, family", [("sdpa", "qwen2"), ("eager", "qwen2"), ("sdpa", "qwen2.5")], ids=lambda v: str(v)
)
@pytest.mark.parametrize(
    "method, options",
    [
        ("fastv", REDUCING["fastv"]),
        ("fastv", {"k": 1, "keep": 0.25}),
        ("aim", REDUCING["aim"]),
        ("aim", {"merge_keep": 1.0, "prune_start": 0.5, "prune_end": 0.5}),
    ],
)
def test_prefill_and_every_decode_step_match_the_reference(method, options, attn, family):
    """Prefill and each decode step of generate() == the unpatched layers by hand at the original 3D positions."""
    model = build(attn, family)
    x = inputs([1])
    x.pop("attention_mask")
    patch = tokenprune.apply(model, method, **options)
    seen = {}

    def keep_embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    with torch.no_grad():
        prefill = model(**x).logits
    hook.remove()
    state = patch.state
    first = state.index_in[0][0]  # input positions entering the LLM (after any merge)
    positions = rope_positions(model, x)[..., first]  # (3, 1, N): original 3-axis positions of what enters the LLM
    slots = [torch.searchsorted(first, index[0]) for index in state.index_in]
    embeds = seen["embeds"]
    torch.testing.assert_close(_by_hand(model, embeds, positions, slots), prefill, rtol=0, atol=1e-5)

    steps = 4
    with torch.no_grad():
        out = greedy(model, x, steps, return_dict_in_generate=True, output_logits=True)
    new = out.sequences[0, x["input_ids"].shape[1] :]
    lm = model.model.language_model
    for step in range(steps):
        grown = torch.cat([embeds, lm.embed_tokens(new[:step])[None]], dim=1)
        tail = positions.amax() + 1 + torch.arange(step)  # decode continues after the prompt's largest position
        grown_positions = torch.cat([positions, tail.expand(3, 1, step)], dim=-1)
        extra = torch.arange(embeds.shape[1], embeds.shape[1] + step)
        reference = _by_hand(model, grown, grown_positions, [torch.cat([s, extra]) for s in slots])
        torch.testing.assert_close(reference[0, -1], out.logits[step][0], rtol=0, atol=1e-5)

    # A plain forward on the prefill's cache (no position_ids: the model numbers the new token itself).
    with torch.no_grad():
        first_step = model(**x)
        token = out.sequences[:, x["input_ids"].shape[1], None]
        second = model(input_ids=token, cache=first_step.cache, mm_token_type_ids=torch.zeros_like(token))
    torch.testing.assert_close(second.logits[0, -1], out.logits[1][0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_padded_batch_equals_samples_run_alone(method, side):
    model = build()
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        batched = model(**inputs([0, 1], side)).logits
        state = patch.state
        width = max(map(len, PROMPTS))
        for b, p in enumerate(PROMPTS):
            alone = model(**inputs([b])).logits[0]
            offset = width - len(p) if side == "left" else 0
            valid = state.valid[b]
            assert [i - offset for i in state.index[b][valid].tolist()] == patch.state.index[0].tolist()
            torch.testing.assert_close(batched[b][valid], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen2.5"])
@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_batched_generate_equals_samples_alone(method, family):
    model = build(family=family)
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        batched = greedy(model, inputs([0, 1]), 5)
        width = max(map(len, PROMPTS))
        for b, p in enumerate(PROMPTS):
            alone = greedy(model, inputs([b]), 5)
            assert batched[b, width:].tolist() == alone[0, len(p) :].tolist()
    assert patch.state.generated == 4


# ----------------------------------------------------------------------------- errors
def test_compact_merge_positions_are_refused_but_prune_only_aim_works():
    model = build()
    with pytest.raises(NotImplementedError, match="merge_positions='original'"):
        tokenprune.apply(model, "aim", merge_keep=0.5)
    assert not hasattr(model, "_tokenprune_patch")
    patch = tokenprune.apply(model, "aim", merge_keep=1.0, prune_start=0.25, prune_end=0.75)
    with torch.no_grad():
        model(**inputs([0]))
    assert patch.state.visual_per_layer() == [[16], [16], [8], [0]]


# ----------------------------------------------------------------------------- spans, embeddings, FLOPs
def test_images_are_split_by_grid_and_merged_separately():
    """Two images in one prompt (16 + 8 tokens, even back to back): each is its own span, merged on its own."""
    from tokenprune.adapters.vlm.qwen2_vl import grid_segments

    grids = [(1, 8, 8), (1, 4, 8)]
    ids = [1, 5] + [IMG] * 24 + [7, 8]  # no separator: only image_grid_thw tells the images apart
    visual = torch.tensor([ids]) == IMG
    segments = grid_segments(visual, torch.tensor(grids), 2)[0]
    assert segments[visual[0]].tolist() == [0] * 16 + [1] * 8 and (segments[~visual[0]] == -1).all()

    model = build()
    ids = torch.tensor([prompt([1, 5], [7, 8], grids)])
    x = {
        "input_ids": ids,
        "mm_token_type_ids": (ids == IMG).int(),
        "pixel_values": pixels(grids),
        "image_grid_thw": torch.tensor(grids),
    }
    patch = tokenprune.apply(model, "aim", merge_keep=0.5, prune_start=1.0, prune_end=1.0, merge_positions="original")
    with torch.no_grad():
        model(**x)
    state = patch.state
    assert state.spans == [[16, 8]]
    first = state.index[0][state.visual[0]] < ids[0].tolist().index(VEND)
    sizes = state.size[0][state.visual[0]]
    assert int(first.sum()) == 8 and len(sizes) == 12
    assert sizes[first].sum() == 16 and sizes[~first].sum() == 8


@pytest.mark.parametrize("method", ["fastv", "aim"])
def test_inputs_embeds_calls_reduce_the_same(method):
    model = build()
    x = inputs([0])
    patch = tokenprune.apply(model, method, **REDUCING[method])
    with torch.no_grad():
        expected = model(**x).logits
        index = patch.state.index
        ids = x.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        model.model.rope_deltas = None
        got = model(inputs_embeds=embeds, **x, position_ids=rope_positions(model, {"input_ids": ids, **x})).logits
    assert torch.equal(patch.state.index, index)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "method, options, family",
    [
        ("fastv", {"keep": 1.0}, "qwen2"),
        ("fastv", REDUCING["fastv"], "qwen2"),
        ("aim", REDUCING["aim"], "qwen2"),
        ("fastv", {"flops": 0.8}, "qwen2"),
        ("fastv", REDUCING["fastv"], "qwen2.5-windows"),
    ],
)
def test_analytic_flops_equal_the_flop_counter(method, options, family):
    """Vision tower + merger + merging + every LLM layer (+ scoring) + LM head, as torch counts them."""
    model = build(family=family)
    patch = tokenprune.apply(model, method, **options)
    report = tokenprune.count_flops(model, inputs([0]))
    assert report.analytic == pytest.approx(report.measured, rel=1e-12)
    assert report.embed > 0 and [row["tokens_in"] for row in report.layers] == [
        n for n, _ in patch.state.tokens_per_layer()
    ]


def test_labels_are_refused_while_reducing():
    model = build()
    x = inputs([0])
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**x, labels=x["input_ids"])
    with tokenprune.disabled(model), torch.no_grad():
        assert model(**x, labels=x["input_ids"]).loss is not None

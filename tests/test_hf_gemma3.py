"""Gemma 3 (transformers 5.x): pooled SigLIP images, sliding-window + global layers, bidirectional image blocks.

A tiny random-weight model built from a config (SigLIP 32 px / patch 4: an 8 x 8 grid average-pooled by 2 to 16
tokens per image; Gemma 3 text model, hidden 64, 4 layers sliding / sliding / full / sliding, q/k-norm, scaled
embeddings): nothing is downloaded. Prompts as Gemma3Processor writes them: each image (or pan-and-scan crop) a run
of 16 ``[IMG]`` between begin/end-of-image tokens, ``token_type_ids`` 1 on ``[IMG]``. The matrix's case has a
window of 64 (the matrix checks cache lengths token for token); here the window is 8, so it cuts every prompt.

What every method has on every family is in test_vlm_matrix; here, the layout and pooling against HF's own, the
tower FLOPs against the counter, and the reduction against an independent reference: HF's decoder layers run by
hand on the kept tokens, each with a mask written out pair by pair (causal, or within one image block, and for a
sliding layer within the last ``sliding_window`` tokens the layer holds), prefill and every ``generate()`` step.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import GEMMA_IMAGE, GEMMA_LAYERS, build_gemma3, families
from tokenprune.adapters.vlm.cache import check_cache
from tokenprune.adapters.vlm.gemma3 import Gemma3Adapter, pooled_tokens
from tokenprune.measure.flops import measure_flops

IMG, WINDOW = GEMMA_IMAGE, 8
REFERENCE_CASES = [  # method, options, sliding window
    ("aim", {"merge_keep": 0.5, "prune_start": 1.0, "prune_end": 1.0}, WINDOW),  # merged before the LLM only
    ("aim", {"merge_keep": 0.5, "prune_start": 0.75, "prune_end": 0.75}, WINDOW),  # + visual removed after layer 2
    ("fastv", {"k": 3, "keep": 0.5}, WINDOW),  # scored at layer 2 (global); layer 3 (sliding) holds the kept tokens
    ("aim", {"merge_keep": 1.0, "prune_start": 0.5, "prune_end": 1.0, "merge_positions": "original"}, WINDOW),
    ("aim", {"merge_keep": 0.5, "prune_start": 0.25, "prune_end": 0.75}, 64),  # removals after layers 1 and 2
    ("fastv", {"k": 2, "keep": 0.5}, 64),  # scored at layer 1 (sliding, within its window)
]


def case():
    return families()["gemma3"]


def model_with(window: int = WINDOW, attn: str = "sdpa") -> torch.nn.Module:
    return build_gemma3(attn, window)


def inputs(names: list[str], types: bool = True) -> dict:
    x = case().inputs(names)
    return x if types else {k: v for k, v in x.items() if k != "token_type_ids"}


def image_blocks(ids: list[int]) -> list[int]:
    """Per position, by reading the ids one at a time: its image block (a run of [IMG]), -1 elsewhere."""
    blocks, block = [], -1
    for i, token in enumerate(ids):
        if token == IMG and (i == 0 or ids[i - 1] != IMG):
            block += 1
        blocks.append(block if token == IMG else -1)
    return blocks


def pair_mask(blocks: list[int], window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """``(1, 1, n, n)`` additive mask: key ``k`` visible to query ``q`` if ``k <= q`` or both lie in one image
    block, and (a sliding layer) ``k > q - window`` in the layer's own sequence."""
    n = len(blocks)
    allowed = torch.tensor(
        [
            [(k <= q or blocks[q] == blocks[k] >= 0) and (window is None or k > q - window) for k in range(n)]
            for q in range(n)
        ]
    )
    return torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def by_hand(model, embeds, positions, slots, blocks) -> torch.Tensor:
    """HF's decoder layers run on ``slots[l]`` (indices into ``embeds``) at layer ``l``, positions kept, each with
    :func:`pair_mask` of its own type and the rotary embedding of its own type."""
    lm = model.model.language_model
    config = lm.config
    hidden, current = embeds, torch.arange(embeds.shape[1])
    with torch.no_grad():
        for layer, block in enumerate(lm.layers):
            block = getattr(block, "base_layer", block)
            hidden = hidden[:, torch.searchsorted(current, slots[layer])]
            current = slots[layer]
            kind = config.layer_types[layer]
            window = config.sliding_window if kind == "sliding_attention" else None
            pos = positions[:, current]
            mask = pair_mask([blocks[i] for i in current.tolist()], window, hidden.dtype)
            hidden = block(
                hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, pos, kind), position_ids=pos
            )
        return model.lm_head(lm.norm(hidden))


def llm_inputs(model, run) -> dict:
    """The kwargs the text model received during ``run()`` (after tokenprune's entry hooks)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])
        seen.setdefault("positions", kwargs.get("position_ids"))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen


# ----------------------------------------------------------------------------- the layout
@pytest.mark.parametrize("names", [["a"], ["b"], ["a", "b"], ["b", "text", "a"]])
def test_one_span_per_image_and_crop_with_begin_end_as_text(names):
    model = case().build()
    adapter = Gemma3Adapter(model)
    x = case().inputs(names)
    with torch.no_grad():
        features = model.model.get_image_features(x["pixel_values"]).pooler_output
    assert features.shape[1] == adapter.tokens_per_image() == 16
    found = adapter.find_visual(x["input_ids"], dict(x))
    assert torch.equal(found.visual, x["input_ids"] == IMG) and found.structural is None
    for row in range(len(names)):
        ids = x["input_ids"][row].tolist()
        segments = found.segments[row].tolist()
        spans = {s for s in segments if s >= 0}
        assert len(spans) == len({b for b in image_blocks(ids) if b >= 0})  # an image or crop: a span
        for block in set(image_blocks(ids)) - {-1}:  # each block one span id, each span one block
            assert len({s for s, b in zip(segments, image_blocks(ids), strict=True) if b == block}) == 1


def test_tower_tokens_pool_as_hfs_projector():
    """A per-patch signal pooled by ``tower_tokens`` == HF's own ``AvgPool2d`` on the patch grid."""
    model = case().build()
    adapter = Gemma3Adapter(model)
    signal = torch.randn(3, 64, 5, generator=torch.Generator().manual_seed(0))  # (I, P, C)
    projector = model.model.multi_modal_projector
    grid = signal.transpose(1, 2).reshape(3, 5, 8, 8)
    expected = projector.avg_pool(grid).flatten(2).transpose(1, 2).flatten(0, 1)  # (I * 16, C)
    torch.testing.assert_close(adapter.tower_tokens(signal), expected, rtol=0, atol=1e-6)
    ids = torch.arange(64, dtype=torch.float32)[None]  # row-major patch ids: window (0, 0) is patches 0, 1, 8, 9
    assert pooled_tokens(ids, 2)[0].item() == (0 + 1 + 8 + 9) / 4


@pytest.mark.parametrize("method", ["visionzip", "vispruner"])
def test_tower_signals_are_hfs_eager_attention_pooled(method, monkeypatch):
    """Per LLM token: the mean attention its 2 x 2 patches receive in HF's own eager SigLIP layer (mean over heads
    and queries; SigLIP has no class token), and their head-averaged keys, pooled as the projector pools."""
    seen = []
    original = Gemma3Adapter.tower_sequence
    monkeypatch.setattr(
        Gemma3Adapter, "tower_sequence", lambda self, f, r: seen.append(original(self, f, r)) or seen[-1]
    )
    model, x = case().build(), case().inputs(["a", "b"])
    patch = tokenprune.apply(model, method, keep=0.5)
    with torch.no_grad():
        model(**x)
    layer = patch.runtime.method.tower_layer % 2
    patch.remove()
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = tower(pixel_values=x["pixel_values"], output_attentions=True).attentions[layer]  # (I, H, P, P)
    received = attentions.mean(dim=(1, 2))  # (I, P)
    pooled = torch.nn.functional.avg_pool2d(received.view(-1, 1, 8, 8), 2).flatten()  # (I * 16,) row-major windows
    signals, placeholders = seen[-1], x["input_ids"] == IMG
    torch.testing.assert_close(signals.attention[placeholders], pooled, rtol=0, atol=1e-6)
    assert not signals.from_class_token and signals.attention[~placeholders].abs().sum() == 0
    assert patch.state.spans == [[16, 16], [16]] and patch.state.visual_in[0].tolist() == [16, 8]


def test_vision_flops_equal_the_counter_on_hfs_tower_and_projector():
    model = case().build()
    adapter = Gemma3Adapter(model)
    pixels = case().inputs(["a"])["pixel_values"]
    measured = measure_flops(lambda: model.model.get_image_features(pixels))
    assert adapter.vision_flops() * pixels.shape[0] == pytest.approx(measured, rel=1e-9)


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("types", [True, False])
@pytest.mark.parametrize("method, options, window", REFERENCE_CASES)
def test_prefill_and_every_decode_step_match_the_reference(method, options, window, types, attn):
    """Window 8 (or 64) on a 43-token prompt: prefill logits and every decode step's == HF's layers run by hand.

    Decode steps check the compact cache of both layer types (sliding layers hold their last 7 kept tokens) and
    their masks; with ``token_type_ids`` the image blocks follow the kept tokens, without them HF's causal masks.
    """
    model = model_with(window, attn)
    x = inputs(["a"], types)
    ids = x["input_ids"][0].tolist()
    patch = tokenprune.apply(model, method, **options)
    seen = llm_inputs(model, lambda: model(**x))
    with torch.no_grad():
        prefill = model(**x).logits
    state = patch.state
    assert state.reduced
    embeds, positions = seen["embeds"], seen["positions"]
    if positions is None:
        positions = torch.arange(embeds.shape[1])[None]
    entry = state.index_in[0][0]
    blocks = [image_blocks(ids)[i] if types else -1 for i in entry.tolist()]
    slots = [torch.searchsorted(entry, index[0]) for index in state.index_in]
    assert window == 64 or max(len(s) for s in slots) > 2 * window  # the window cuts
    torch.testing.assert_close(by_hand(model, embeds, positions, slots, blocks), prefill, rtol=0, atol=1e-5)

    steps = 4
    with torch.no_grad():
        out = case().greedy(model, x, steps, return_dict_in_generate=True, output_logits=True)
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [
        min(len(s) + steps - 1, window - 1) if kind == "sliding_attention" else len(s) + steps - 1
        for s, kind in zip(slots, GEMMA_LAYERS, strict=True)
    ]
    new = out.sequences[0, len(ids) :]
    lm = model.model.language_model
    for step in range(steps):
        grown = torch.cat([embeds, lm.embed_tokens(new[:step])[None]], dim=1)
        grown_positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(step)[None]], dim=1)
        extra = torch.arange(embeds.shape[1], embeds.shape[1] + step)
        reference = by_hand(model, grown, grown_positions, [torch.cat([s, extra]) for s in slots], blocks + [-1] * step)
        torch.testing.assert_close(reference[0, -1], out.logits[step][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method, options, window", REFERENCE_CASES)
def test_batched_generate_equals_each_sample_alone(method, options, window):
    """Left-padded (43- and 26-token prompts), window 8 or 64: greedy tokens and logits of the batch == each alone."""
    model = model_with(window)
    tokenprune.apply(model, method, **options)
    names = ["a", "b"]
    with torch.no_grad():
        batched = case().greedy(model, case().inputs(names), 5, return_dict_in_generate=True, output_logits=True)
        width = batched.sequences.shape[1] - 5
        for b, name in enumerate(names):
            alone = case().greedy(model, case().inputs([name]), 5, return_dict_in_generate=True, output_logits=True)
            assert batched.sequences[b, width:].tolist() == alone.sequences[0, -5:].tolist()
            for step in range(5):
                torch.testing.assert_close(batched.logits[step][b], alone.logits[step][0], rtol=0, atol=1e-5)


def test_zero_reduction_is_bit_exact_with_a_cutting_window():
    model = model_with(WINDOW)
    x = case().inputs(["a", "b"])
    with torch.no_grad():
        expected = model(**x).logits
        tokens = case().greedy(model, x)
        patch = tokenprune.apply(model, "aim", merge_keep=1.0, prune_start=1.0, prune_end=1.0)
        assert torch.equal(model(**x).logits, expected) and torch.equal(case().greedy(model, x), tokens)
    assert not patch.state.reduced


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("window, k", [(64, 2), (WINDOW, 3)])
def test_fastv_keeps_the_tokens_hf_eager_attention_ranks_highest(window, k):
    """Scored at layer k - 1 (sliding within its window, or global past a cutting window): the kept visual tokens
    are the top half of HF's own eager attention of the last token, head-averaged. HF's Gemma 3 applies no logit
    softcapping (set here, it changes nothing), and neither does the scoring."""
    model = model_with(window, "eager")
    x = case().inputs(["b"])
    with torch.no_grad():
        plain = model(**x).logits
        model.config.text_config.attn_logit_softcapping = 5.0
        out = model(**x, output_attentions=True)
    assert torch.equal(out.logits, plain)  # HF's Gemma 3 attention ignores attn_logit_softcapping
    attention = out.attentions[k - 1][0].mean(dim=0)[-1]
    visual = (x["input_ids"][0] == IMG).nonzero().squeeze(1)
    expected = visual[attention[visual].topk(8).indices].sort().values
    model.set_attn_implementation("sdpa")
    patch = tokenprune.apply(model, "fastv", k=k, keep=0.5)
    with torch.no_grad():
        model(**x)
    kept = patch.state.index_in[k][0]
    assert torch.equal(kept[torch.isin(kept, visual)], expected)


def test_each_scoring_layer_rotates_with_its_own_rope():
    """AIM scores at layer 1 (sliding: local RoPE base) and, on the tokens kept there, at layer 2 (global): each
    context's ``(cos, sin)`` is HF's rotary embedding of that layer's type at the kept tokens' positions."""
    model = model_with(64)
    lm = model.model.language_model
    patch = tokenprune.apply(model, "aim", merge_keep=1.0, prune_start=0.25, prune_end=0.75)
    contexts = []
    importance = patch.adapter.method.importance
    patch.adapter.method.importance = lambda ctx: contexts.append(ctx) or importance(ctx)
    with torch.no_grad():
        model(**case().inputs(["a"]))
        for ctx in contexts:
            index = patch.state.index_in[ctx.layer]  # (1, N): input positions of the scored tokens
            cos, sin = lm.rotary_emb(ctx.queries, index, GEMMA_LAYERS[ctx.layer])
            torch.testing.assert_close(ctx.position_embeddings[0], cos, rtol=0, atol=0)
            torch.testing.assert_close(ctx.position_embeddings[1], sin, rtol=0, atol=0)
    assert [ctx.layer for ctx in contexts] == [1, 2]
    local, full = (lm.rotary_emb(ctx.queries, patch.state.index_in[2], kind)[0] for kind in GEMMA_LAYERS[1:3])
    assert not torch.allclose(local, full)  # the two types do differ


def test_scoring_at_a_sliding_layer_past_its_window_is_refused():
    model = model_with(WINDOW)
    tokenprune.apply(model, "fastv", k=2, keep=0.5)  # scored at layer 1, sliding, window 8 < 43 tokens
    with pytest.raises(NotImplementedError, match=r"layer 1, a sliding-window layer .*layers \[2\]"):
        with torch.no_grad():
            model(**case().inputs(["a"]))
    model = model_with(WINDOW)
    patch = tokenprune.apply(model, "random_visual", k=2, keep=0.5)  # reads no attention: nothing to refuse
    with torch.no_grad():
        model(**case().inputs(["a"]))
    assert patch.state.visual_in[2][0] == 16


# ----------------------------------------------------------------------------- cache and errors
def test_sliding_caches_are_accepted_only_where_a_family_declares_the_windows():
    text = model_with(WINDOW).config.text_config
    cache = hf.DynamicCache(config=text)
    windows = [WINDOW if kind == "sliding_attention" else None for kind in GEMMA_LAYERS]
    check_cache(cache, windows)
    with pytest.raises(NotImplementedError, match="full-attention layers only"):
        check_cache(cache)  # every other family: full-attention layers only, as before
    with pytest.raises(NotImplementedError, match="sliding-window/full layers"):
        check_cache(cache, [WINDOW + 1 if w else None for w in windows])


def test_other_families_still_refuse_sliding_layers():
    refusing = type("NoSliding", (Gemma3Adapter,), {"sliding_attention": False})
    with pytest.raises(NotImplementedError, match="sliding-window attention layers"):
        refusing(case().build())


def test_other_attention_implementations_are_refused():
    model = case().build()
    model.model.language_model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"supports \['sdpa', 'eager'\]"):
        tokenprune.apply(model, "fastv")


def test_unknown_layouts_and_bidirectional_text_models_are_refused():
    model = case().build()
    del model.model.multi_modal_projector
    with pytest.raises(TypeError, match="'multi_modal_projector'"):
        tokenprune.apply(model, "fastv")
    model = case().build()
    del model.model.multi_modal_projector.mm_input_projection_weight
    with pytest.raises(TypeError, match="multi_modal_projector.mm_input_projection_weight"):
        tokenprune.apply(model, "fastv")
    model = case().build()
    model.model.language_model.config.use_bidirectional_attention = True
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"):
        tokenprune.apply(model, "fastv")


def test_prepared_masks_and_labels_are_refused_while_reducing():
    model = case().build()
    x = case().inputs(["a"])
    tokenprune.apply(model, "fastv", keep=0.5)
    with pytest.raises(NotImplementedError, match="labels"), torch.no_grad():
        model(**x, labels=x["input_ids"])
    masks = {"full_attention": None, "sliding_attention": None}
    with pytest.raises(NotImplementedError, match="4D attention mask"), torch.no_grad():
        model(**x, attention_mask=masks)


def test_registered_for_gemma3_only():
    assert tokenprune.registry.find_adapter(case().build()) is Gemma3Adapter
    text_only = hf.Gemma3ForCausalLM(
        hf.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
        )
    )
    with pytest.raises(TypeError, match="Gemma3ForConditionalGeneration"):
        tokenprune.apply(text_only, "fastv")

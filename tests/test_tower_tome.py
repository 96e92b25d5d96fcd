"""``tokenprune.apply(llava, "tome", r=...)``: ToMe inside the vision tower, fewer visual tokens for the LLM.

The reference for what the LLM reads is ToMe applied to the bare CLIP tower (the ViT path, ``trace_source=True``)
with its layers cut at the feature layer, so the merged tokens are that tower's ``last_hidden_state`` (no hidden
states requested): one LLM token per merged patch group, in the order of the group's first patch, embedding = the
projected merged token, size = patches in the group. The shared VLM matrix runs ``tome`` on LLaVA too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import FAMILIES, LLAVA_ID, TEXT, families, llava_pixels
from tests.vlm_checks import assert_batch_rows_equal_alone, assert_remove_restores, assert_zero_reduction_exact
from tokenprune import registry

TOWER_DEPTH = 3


TOWERS = {  # 32px / patch 8: 16 patches (+ a class token: CLIP, DINOv2)
    "clip": lambda **kw: hf.CLIPVisionConfig(**kw),
    "siglip": lambda **kw: hf.SiglipVisionConfig(**kw, vision_use_head=False),
    "dinov2": lambda **kw: hf.Dinov2Config(**kw),
}


def build(feature_layer: int | list[int] = -2, strategy: str = "default", attn: str = "sdpa", tower: str = "clip"):
    """A tiny LLaVA: a 3-layer 32px / patch 8 vision tower (CLIP by default), a 4-layer Llama."""
    torch.manual_seed(0)
    vision = TOWERS[tower](
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TOWER_DEPTH,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = hf.LlavaConfig(
        vision_config=vision,
        text_config=hf.LlamaConfig(**TEXT, max_position_embeddings=256),
        image_token_id=LLAVA_ID,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        pad_token_id=0,
    )
    model = hf.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def prompt(tokens: int = 16, images: int = 1, before: tuple = (1, 5, 6)) -> list[int]:
    """Text, ``images`` runs of ``tokens`` placeholders apart by token 3, text."""
    ids = list(before)
    for image in range(images):
        ids += ([3] if image else []) + [LLAVA_ID] * tokens
    return ids + [7, 8, 9, 10]


def inputs(tokens: int = 16, images: int = 1, seed: int = 1) -> dict:
    return {"input_ids": torch.tensor([prompt(tokens, images)]), "pixel_values": llava_pixels(images, seed)}


def greedy(model, x, steps=4, **kwargs):
    return model.generate(**x, max_new_tokens=steps, do_sample=False, **kwargs)


def llm_inputs(model) -> list[torch.Tensor]:
    """Arms a recorder of the ``inputs_embeds`` the language model's layers receive (after the reducer's rewrite)."""
    seen: list[torch.Tensor] = []
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    return seen


def reference(model, pixels: torch.Tensor, r: int, layers: list[int], strategy: str):
    """Per image: ``(embeds (K, C), size (K,))`` the LLM should read, from ToMe on the bare, truncated CLIP tower."""
    merged, sources = [], []
    for k in layers:  # hidden state k: the output of the first k tower layers
        tower = copy.deepcopy(model.model.vision_tower)
        encoder = getattr(tower, "vision_model", tower).encoder
        name = "layers" if hasattr(encoder, "layers") else "layer"  # CLIP/SigLIP, DINOv2
        setattr(encoder, name, getattr(encoder, name)[:k])
        patch = tokenprune.apply(tower, "tome", r=r, trace_source=True)
        out = []  # the encoder's output, before any final norm (SigLIP's and DINOv2's last_hidden_state have one)
        encoder.register_forward_hook(lambda module, args, output, out=out: out.append(output[0]))
        with torch.no_grad():
            tower(pixels)
        merged.append(out[0])  # (I, N_k, C)
        sources.append(patch.state.source)  # (I, N_k, N)
    first = 0 if strategy == "full" else 1  # "default" drops the class token (token 0)
    result = []
    for image in range(pixels.shape[0]):
        source = sources[-1][image, :, first:]  # (N_k, P) the latest feature layer's groups
        held = source.sum(dim=1) > 0
        starts = source.argmax(dim=1)[held]  # first patch of every group
        order = starts.argsort()
        members, size = source[held][order].bool(), source.sum(dim=1)[held][order]  # (K, P), (K,)
        features = []
        for x, src in zip(merged, sources, strict=True):
            holder = src[image, :, first:].argmax(dim=0)  # (P,) merged token holding each patch
            features.append(x[image, holder])  # (P, C) every patch's feature at this layer
        with torch.no_grad():
            projected = model.model.multi_modal_projector(torch.cat(features, dim=-1))  # (P, C')
        result.append((torch.stack([projected[m].mean(dim=0) for m in members]), size))
    return result


# ----------------------------------------------------------------------------- exactness
def test_zero_r_is_bit_exact():
    model = build()
    patch = assert_zero_reduction_exact(model, inputs(), "tome", {"r": 0}, greedy)
    assert patch.adapter.tower_merge.schedule == [0] * TOWER_DEPTH


def test_remove_restores_the_tower_and_the_llm():
    model = build()
    tower_types = [type(m) for m in model.model.vision_tower.modules()]
    assert_remove_restores(model, inputs(), "tome", {"r": 2}, greedy)
    assert [type(m) for m in model.model.vision_tower.modules()] == tower_types


# ----------------------------------------------------------------------------- what the LLM reads
@pytest.mark.parametrize(
    ("tower", "feature_layer", "strategy", "layers", "tokens"),
    [
        ("clip", -2, "default", [2], 16),
        ("clip", -1, "full", [3], 17),
        ("clip", [-3, -1], "default", [1, 3], 16),
        ("siglip", -2, "full", [2], 16),
        ("dinov2", -2, "default", [2], 16),
    ],
)
def test_llm_reads_the_merged_tower_tokens(tower, feature_layer, strategy, layers, tokens):
    """The visual tokens entering the LLM == ToMe on the bare tower cut at the feature layer(s), projected."""
    model = build(feature_layer, strategy, tower=tower)
    r = 3
    patch = tokenprune.apply(model, "tome", r=r)
    seen = llm_inputs(model)
    x = inputs(tokens, images=2)
    with torch.no_grad():
        model(**x)
    state = patch.state
    twin = build(feature_layer, strategy, tower=tower)  # unpatched, same weights
    expected = reference(twin, x["pixel_values"], r, layers, strategy)
    embeds, visual, size = seen[-1][0], state.visual[0], state.size[0]
    got_embeds, got_size = embeds[visual], size[visual]
    spans = state.spans[0]
    assert len(spans) == 2 and got_embeds.shape[0] == sum(e.shape[0] for e, _ in expected)
    removed = r * layers[-1]  # r per tower layer before the latest feature layer
    assert [e.shape[0] for e, _ in expected] == [spans[0] - removed] * 2  # known before the tower ran
    torch.testing.assert_close(got_embeds, torch.cat([e for e, _ in expected]), rtol=0, atol=1e-5)
    assert torch.equal(got_size, torch.cat([s for _, s in expected]).to(got_size.dtype))
    assert state.reduced


def test_merges_after_the_feature_layer_reduce_nothing_before_the_llm():
    """Merges after the feature layer change no feature: the LLM input is the unpatched one (bit-exact logits)."""
    model = build(feature_layer=1)
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
        patch = tokenprune.apply(model, "tome", r=[0, 3, 3])
        assert torch.equal(model(**x).logits, expected)
    assert not patch.state.reduced


def test_batch_equals_each_prompt_alone():
    model = build()
    patch = tokenprune.apply(model, "tome", r=2)
    prompts = [prompt(), prompt(before=(1, 11, 12, 13))]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    pixels = llava_pixels(2)
    batched = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    with torch.no_grad():
        logits = model(**batched).logits
    singles = [{"input_ids": torch.tensor([p]), "pixel_values": pixels[i : i + 1]} for i, p in enumerate(prompts)]
    assert_batch_rows_equal_alone(model, patch, logits, patch.state, singles, [len(p) for p in prompts], "left")


def test_generate_equals_full_recompute_each_step():
    """generate() on the compact cache == re-running the whole reduced prefill for every new token."""
    model = build()
    tokenprune.apply(model, "tome", r=2)
    x = inputs()
    with torch.no_grad():
        tokens = greedy(model, x, steps=5)
        ids = x["input_ids"]
        for _ in range(5):
            step = model(input_ids=ids, pixel_values=x["pixel_values"]).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    assert torch.equal(tokens, ids)


def test_eager_equals_sdpa():
    results = []
    for attn in ("sdpa", "eager"):
        model = build(attn=attn)
        patch = tokenprune.apply(model, "tome", r=2)
        with torch.no_grad():
            results.append((model(**inputs()).logits, patch.state.size))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    assert torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("options", [{"r": 2}, {"r": [4, 0, 3]}, {"flops": 0.8}])
def test_analytic_flops_equal_the_flop_counter(options):
    """Reduced tower + projector on every patch + LLM on the collapsed tokens, as torch counts them."""
    model = build()
    x = inputs()
    full = tokenprune.count_flops(model, x)
    patch = tokenprune.apply(model, "tome", **options)
    reduced = tokenprune.count_flops(model, x)
    assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9)
    assert reduced.measured < full.measured and reduced.layers[-1]["tokens_out"] < full.layers[-1]["tokens_out"]
    merge = patch.adapter.tower_merge
    tower = merge.tower_adapter
    tower_flops = tower.analytic_flops(merge.num_tokens, merge.schedule, merge.runtime.method)["total"]
    linears = [m for m in model.model.multi_modal_projector.modules() if isinstance(m, torch.nn.Linear)]
    projector = 2.0 * 16 * sum(m.weight.numel() for m in linears)  # on all 16 patches: it runs unmerged
    assert reduced.embed == pytest.approx(tower_flops + projector, rel=1e-12)


def test_flops_budget_is_a_fraction_of_the_tower():
    model = build()
    patch = tokenprune.apply(model, "tome", flops=0.8)
    merge = patch.adapter.tower_merge
    tower = merge.tower_adapter
    depth = tower.depth
    cost = lambda s: tower.analytic_flops(merge.num_tokens, s, merge.runtime.method)["total"]  # noqa: E731
    assert abs(cost(merge.schedule) / cost([0] * depth) - 0.8) < 0.05
    assert sum(merge.schedule) > 0


# ----------------------------------------------------------------------------- what is refused
@pytest.mark.parametrize("name", FAMILIES)
def test_families_without_tower_merging_raise_the_reason(name):
    model = families()[name].build()
    adapter = registry.find_adapter(model)
    if adapter.tower_merging:
        assert tokenprune.apply(model, "tome", r=1).adapter.tower_merge is not None
        return
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration") as error:
        tokenprune.apply(model, "tome", r=1)
    assert adapter.no_tower_merging in str(error.value) and type(model).__name__ in str(error.value)
    assert not hasattr(model, "_tokenprune_patch")


def test_a_tower_whose_dropped_token_is_a_patch_is_refused():
    """SigLIP has no class token: LLaVA's ``default`` strategy drops a patch, which may hold a merged group."""
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy='full'"):
        tokenprune.apply(build(tower="siglip"), "tome", r=2)


def test_a_bare_tower_still_refuses_hidden_states():
    """Outside a VLM's tower merge, reducing layers keep refusing ``output_hidden_states`` (lengths would differ)."""
    tower = copy.deepcopy(build().model.vision_tower)
    tokenprune.apply(tower, "tome", r=2)
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        tower(llava_pixels(1), output_hidden_states=True)


def test_another_feature_layer_at_call_time_is_refused():
    model = build()
    tokenprune.apply(model, "tome", r=2)
    with pytest.raises(NotImplementedError, match="vision_feature_layer"):
        model(**inputs(), vision_feature_layer=-3)


def test_disabled_and_precomputed_features():
    """Inside ``disabled`` the tower runs whole; features passed without pixels cannot be collapsed (clear error)."""
    model = build()
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
        tokenprune.apply(model, "tome", r=2)
        with tokenprune.disabled(model):
            assert torch.equal(model(**x).logits, expected)
        embeds = model.get_input_embeddings()(x["input_ids"])
        with pytest.raises(RuntimeError, match="pixel_values"):
            model(inputs_embeds=embeds)

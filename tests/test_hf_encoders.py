"""Hugging Face encoders (ViT, CLIP, SigLIP, DINOv2): the timm adapter's exactness properties, parametrised
over adapters x methods, plus attention implementations, SigLIP's size-weighted pool, the LLaVA guard and
"one algorithm, two adapters" (HF Dinov2Model == timm DINOv2 with the same weights).

Tiny random-weight models built from configs: nothing is downloaded. Tolerances: zero reduction and
remove() are bit-exact (torch.equal); batch-vs-single and sdpa-vs-eager use 1e-5 / 1e-4 in float32.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from timm.models.vision_transformer import VisionTransformer

import tokenprune
from tokenprune.weights.hf_dinov2 import timm_to_hf_dinov2

METHODS = ["none", "tome", "evit", "random"]
SIZE, PATCH, DIM, DEPTH, HEADS = 64, 8, 64, 4, 4  # 64 patches (+ prefix), 4 layers of 4 heads
_VISION = dict(hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS)
_VISION.update(image_size=SIZE, patch_size=PATCH)
_DINO = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH)

# name -> (factory, extra apply() options)
MODELS = {
    "vit_cls": (lambda: hf.ViTForImageClassification(hf.ViTConfig(**_VISION, num_labels=5)), {}),
    "vit_pooler": (lambda: hf.ViTModel(hf.ViTConfig(**_VISION)), {}),
    "clip_proj": (
        lambda: hf.CLIPVisionModelWithProjection(hf.CLIPVisionConfig(**_VISION, projection_dim=16)),
        {},
    ),
    "siglip": (lambda: hf.SiglipVisionModel(hf.SiglipVisionConfig(**_VISION)), {}),
    "dinov2": (lambda: hf.Dinov2Model(hf.Dinov2Config(**_DINO)), {"input_size": SIZE}),
    "dinov2_reg": (
        lambda: hf.Dinov2WithRegistersModel(hf.Dinov2WithRegistersConfig(**_DINO, num_register_tokens=2)),
        {"input_size": SIZE},
    ),
}


def build(name: str, attn: str = "sdpa") -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """A fresh eval-mode model (same weights for a given name), 2 images and its apply() options."""
    factory, options = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():  # random init leaves class token / layer scale tiny: perturb so every path matters
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return model, images, dict(options)


def outputs(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor output the model family has: logits / image_embeds / pooler_output / last_hidden_state."""
    out = model(images)
    names = ("logits", "image_embeds", "pooler_output", "last_hidden_state")
    return [getattr(out, n) for n in names if getattr(out, n, None) is not None]


def skip_evit(method: str, name: str) -> None:
    if method == "evit" and name == "siglip":
        pytest.skip("SigLIP has no class token for evit (its error is tested separately)")


def hooks(model: torch.nn.Module) -> dict:
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


@pytest.fixture(params=sorted(MODELS))
def name(request) -> str:
    return request.param


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_reduction_is_bit_exact(name, method, attn):
    skip_evit(method, name)
    model, images, options = build(name, attn)
    with torch.no_grad():
        expected = outputs(model, images)
        patch = tokenprune.apply(model, method, r=0, **options)
        got = outputs(model, images)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    assert len(patch.state.log) == DEPTH
    assert all(e.tokens_in == e.tokens_out == patch.state.num_original for e in patch.state.log)


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_modules_hooks_and_outputs(name, method):
    skip_evit(method, name)
    model, images, options = build(name)
    module_types = [(n, type(m)) for n, m in model.named_modules()]
    hooks_before = hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = outputs(model, images)
        patch = tokenprune.apply(model, method, r=0 if method == "none" else 3, **options)
        reduced = outputs(model, images)
        assert patch.remove() is model
        restored = outputs(model, images)
    assert all(torch.equal(r, e) for r, e in zip(restored, expected, strict=True))
    if method != "none":
        assert not torch.equal(reduced[0], expected[0])
    assert [(n, type(m)) for n, m in model.named_modules()] == module_types
    assert hooks(model) == hooks_before and not hasattr(model, "_tokenprune_patch")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("method", ["tome", "evit", "random"])
def test_sizes_indices_and_sources(name, method):
    skip_evit(method, name)
    model, images, options = build(name)
    patch = tokenprune.apply(model, method, r=3, trace_source=True, **options)
    with torch.no_grad():
        out = model(images)
    state = patch.state
    n0, prefix = state.num_original, state.num_protected
    assert n0 == patch.adapter.num_tokens((SIZE, SIZE)) and state.num_tokens == n0 - 3 * DEPTH
    if hasattr(out, "last_hidden_state"):  # documented: fewer tokens once reduced
        assert out.last_hidden_state.shape[1] == state.num_tokens
    torch.testing.assert_close(state.size.sum(dim=(1, 2)) + state.dropped, torch.full((2,), float(n0)))
    if method != "random":
        assert torch.all(state.dropped == 0)
        assert torch.equal(state.source.sum(dim=1), torch.ones(2, n0))
    torch.testing.assert_close(state.source.sum(dim=-1, keepdim=True), state.size)
    index = state.index
    assert index.min() >= 0 and index.max() < n0 and torch.all(index[:, 1:] > index[:, :-1])
    assert torch.equal(index[:, :prefix], torch.arange(prefix).expand(2, prefix))
    assert [e.tokens_in - e.tokens_out for e in state.log] == patch.runtime.schedule == [3] * DEPTH


def test_prefix_tokens_per_family():
    expected = {"vit_cls": 1, "vit_pooler": 1, "clip_proj": 1, "siglip": 0, "dinov2": 1, "dinov2_reg": 3}
    for model_name, prefix in expected.items():
        model, _, options = build(model_name)
        patch = tokenprune.apply(model, "tome", r=2, **options)
        assert patch.adapter.num_protected == prefix and patch.adapter.has_class_token == (prefix > 0)


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_batch_equals_one_by_one(name, method):
    skip_evit(method, name)
    model, images, options = build(name)
    tokenprune.apply(model, method, r=3, **options)
    with torch.no_grad():
        batched = outputs(model, images)
        singles = [outputs(model, images[i : i + 1]) for i in range(2)]
    for index, tensor in enumerate(batched):
        torch.testing.assert_close(tensor, torch.cat([s[index] for s in singles]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tome", "evit", "random"])
def test_sdpa_and_eager_agree_under_reduction(name, method):
    skip_evit(method, name)
    results = []
    for attn in ("sdpa", "eager"):
        model, images, options = build(name, attn)
        patch = tokenprune.apply(model, method, r=3, **options)
        with torch.no_grad():
            results.append(outputs(model, images))
        assert patch.state.num_tokens == patch.state.num_original - 3 * DEPTH
    for sdpa, eager in zip(*results, strict=True):
        torch.testing.assert_close(sdpa, eager, atol=1e-4, rtol=1e-4)


def test_disabled_runs_the_original_path(name):
    model, images, options = build(name)
    with torch.no_grad():
        expected = outputs(model, images)
        patch = tokenprune.apply(model, "tome", r=4, **options)
        with tokenprune.disabled(model):
            inside = outputs(model, images)
        after = outputs(model, images)
    assert all(torch.equal(i, e) for i, e in zip(inside, expected, strict=True))
    assert not torch.equal(after[0], expected[0]) and patch.runtime.enabled


# ----------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("method", [None, "tome", "evit", "random"])
def test_analytic_matches_measured(name, method):
    if method is not None:
        skip_evit(method, name)
    model, images, options = build(name)
    if method is not None:
        tokenprune.apply(model, method, r=3, **options)
    report = tokenprune.count_flops(model, images)
    assert report.analytic == pytest.approx(report.measured, rel=0.02)
    assert len(report.layers) == DEPTH
    assert [row["tokens_in"] - row["tokens_out"] for row in report.layers] == [0 if method is None else 3] * DEPTH


@pytest.mark.parametrize("budget", [0.8, 0.65])
@pytest.mark.parametrize("method", ["tome", "evit", "random"])
def test_flops_budget_lands_within_two_percent(name, method, budget):
    skip_evit(method, name)
    model, images, options = build(name)
    baseline = tokenprune.count_flops(model, images[:1]).measured
    patch = tokenprune.apply(model, method, flops=budget, **options)
    reduced = tokenprune.count_flops(model, images[:1]).measured
    assert reduced / baseline == pytest.approx(budget, abs=0.02 * budget)
    assert len(patch.schedule) == DEPTH


def test_dinov2_budget_needs_input_size():
    model, _, _ = build("dinov2")
    with pytest.raises(ValueError, match=r"Dinov2Model accepts any image size.*pass input_size"):
        tokenprune.apply(model, "tome", flops=0.7)


# ----------------------------------------------------------------- errors
def test_evit_needs_a_class_token():
    model, _, _ = build("siglip")
    with pytest.raises(ValueError, match=r"'evit' scores tokens by class-token attention"):
        tokenprune.apply(model, "evit", r=2)


def test_unsupported_attention_implementation_raises():
    model, images, _ = build("vit_cls")
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=r"attn_implementation='flex_attention'.*\['sdpa', 'eager'\]"):
        tokenprune.apply(model, "tome", r=2)
    model.set_attn_implementation("sdpa")
    tokenprune.apply(model, "tome", r=2)
    model.set_attn_implementation("flex_attention")  # switched after apply: refused at forward time
    with pytest.raises(ValueError, match=r"\['sdpa', 'eager'\]"), torch.no_grad():
        model(images)


def test_caller_attention_mask_is_refused():
    model, images, _ = build("vit_pooler")
    mask = torch.ones(2, 1 + (SIZE // PATCH) ** 2)
    mask[0, 5] = 0
    tokenprune.apply(model, "tome", r=2)
    with pytest.raises(NotImplementedError, match="caller-supplied attention_mask"), torch.no_grad():
        model(images, attention_mask=mask)
    with tokenprune.disabled(model), torch.no_grad():
        model(images, attention_mask=mask)


def test_hidden_states_refused_only_while_reducing():
    model, images, _ = build("clip_proj")
    patch = tokenprune.apply(model, "tome", r=3)
    with pytest.raises(NotImplementedError, match=r"output_hidden_states is not supported.*LLaVA"):
        model(images, output_hidden_states=True)
    with tokenprune.disabled(model), torch.no_grad():
        assert len(model(images, output_hidden_states=True).hidden_states) == DEPTH + 1
    patch.remove()
    tokenprune.apply(model, "tome", r=0)
    with torch.no_grad():
        assert len(model(images, output_hidden_states=True).hidden_states) == DEPTH + 1


def test_clip_model_is_patched_through_its_vision_tower():
    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = hf.CLIPConfig(text_config=text, vision_config=dict(_VISION), projection_dim=16)
    model = hf.CLIPModel(config).eval()
    with pytest.raises(TypeError, match=r"unsupported model type CLIPModel.*clip_model\.vision_model"):
        tokenprune.apply(model, "tome", r=2)
    inputs = dict(input_ids=torch.tensor([[1, 5, 7, 2]]), pixel_values=torch.randn(2, 3, SIZE, SIZE))
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
        patch = tokenprune.apply(model.vision_model, "tome", r=4)
        reduced = model(**inputs).logits_per_image
        patch.remove()
        restored = model(**inputs).logits_per_image
    assert reduced.shape == expected.shape and not torch.equal(reduced, expected)
    assert torch.equal(restored, expected)


def test_llava_is_unsupported_and_its_patched_vision_tower_raises_our_error():
    torch.manual_seed(0)
    vision = hf.CLIPVisionConfig(**{**_VISION, "image_size": 32, "num_hidden_layers": 2})
    text = hf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config = hf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=60, image_seq_length=16)
    llava = hf.LlavaForConditionalGeneration(config).eval()
    inputs = dict(input_ids=torch.tensor([[1] + [60] * 16 + [5, 6]]), pixel_values=torch.randn(1, 3, 32, 32))
    # A ViT method on the whole VLM: the unsupported-model error, or the LLaVA adapter's own (once registered).
    with pytest.raises(TypeError, match=r"LlavaForConditionalGeneration"):
        tokenprune.apply(llava, "tome", r=2)
    with torch.no_grad():
        expected = llava(**inputs).logits
        patch = tokenprune.apply(llava.model.vision_tower, "tome", r=2)
        with pytest.raises(NotImplementedError, match=r"vision tower of a VLM \(e\.g\. LLaVA"):
            llava(**inputs)
        with tokenprune.disabled(llava.model.vision_tower):
            assert torch.equal(llava(**inputs).logits, expected)
        patch.remove()
        assert torch.equal(llava(**inputs).logits, expected)


# ----------------------------------------------------------------- SigLIP pooling
def test_siglip_attention_pool_is_size_weighted():
    model, images, _ = build("siglip")
    patch = tokenprune.apply(model, "tome", r=6)
    with torch.no_grad():
        out = model(images)
        tokens, size = out.last_hidden_state, patch.state.size  # (B, N', C), (B, N', 1)
        assert size.max() > 1
        # Size weighting == pooling the unmerged sequence: each merged token repeated `size` times.
        unmerged = torch.stack([tokens[b].repeat_interleave(size[b, :, 0].round().long(), dim=0) for b in range(2)])
        assert unmerged.shape[1] == (SIZE // PATCH) ** 2
        with tokenprune.disabled(model):  # the pool's size mask is off: the plain head
            expected = model.head(unmerged)
            unweighted = model.head(tokens)
    torch.testing.assert_close(out.pooler_output, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.pooler_output, unweighted, atol=1e-4)


# ----------------------------------------------------------------- HF DINOv2 == timm DINOv2
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_dinov2_and_timm_dinov2_are_one_algorithm(attn):
    torch.manual_seed(0)
    # vit_small_patch14_dinov2's recipe at toy size: LayerScale, qkv bias, LayerNorm eps 1e-6, GELU MLP x4.
    timm_model = VisionTransformer(
        img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, init_values=1.0, num_classes=0
    ).eval()
    with torch.no_grad():
        for param in timm_model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    config = hf.Dinov2Config(**_DINO, layer_norm_eps=1e-6, mlp_ratio=4, layerscale_value=1.0, hidden_act="gelu")
    hf_model = hf.Dinov2Model(config).eval()
    hf_model.set_attn_implementation(attn)
    missing, unexpected = hf_model.load_state_dict(timm_to_hf_dinov2(timm_model.state_dict(), DEPTH), strict=False)
    assert missing == ["embeddings.mask_token"] and not unexpected  # mask token: pre-training only
    # At the config size neither library resamples its position embeddings. (At other sizes they differ by
    # themselves: timm resamples bicubic with antialias, HF without; that is not tokenprune's doing.)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model(images).last_hidden_state, timm_model.forward_features(images), atol=1e-4, rtol=1e-4
        )
        for method in ("tome", "evit"):
            timm_patch = tokenprune.apply(timm_model, method, r=5)
            hf_patch = tokenprune.apply(hf_model, method, r=5)
            got, expected = hf_model(images).last_hidden_state, timm_model.forward_features(images)
            assert got.shape == expected.shape == (2, 1 + (SIZE // PATCH) ** 2 - 5 * DEPTH, DIM)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            assert torch.equal(hf_patch.state.index, timm_patch.state.index)
            torch.testing.assert_close(hf_patch.state.size, timm_patch.state.size)
            timm_patch.remove()
            hf_patch.remove()

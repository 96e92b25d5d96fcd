"""Hugging Face encoders (ViT, CLIP, SigLIP, DINOv2): what is specific to them (the exactness properties of
every method x encoder run in test_vit_matrix): prefix tokens, attention implementations and masks, SigLIP's
size-weighted pool, the LLaVA guard and "one algorithm, two adapters" (HF Dinov2Model == timm DINOv2).

Tiny random-weight models built from configs: nothing is downloaded. Tolerances: bit-exact (torch.equal)
where nothing is reduced; 1e-4 (float32) between HF and timm.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from timm.models.vision_transformer import VisionTransformer

import tokenprune
from tests.helpers import vit_forms
from tokenprune.zoo.weights.hf_dinov2 import timm_to_hf_dinov2

SIZE, PATCH, DIM, DEPTH, HEADS = vit_forms.SIZE, vit_forms.PATCH, vit_forms.DIM, vit_forms.DEPTH, vit_forms.HEADS
_VISION, _DINO = vit_forms.VISION, vit_forms.DINO


def build(name: str, attn: str = "sdpa") -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """A fresh eval-mode model (same weights for a given name: the ``hf_<name>`` form), 2 images, apply() options."""
    return vit_forms.build(f"hf_{name}", attn)


# ----------------------------------------------------------------- exactness
def test_prefix_tokens_per_family():
    expected = {"vit_cls": 1, "vit_pooler": 1, "clip_proj": 1, "siglip": 0, "dinov2": 1, "dinov2_reg": 3}
    for model_name, prefix in expected.items():
        model, _, options = build(model_name)
        patch = tokenprune.apply(model, "tome", r=2, **options)
        assert patch.adapter.num_protected == prefix and patch.adapter.has_class_token == (prefix > 0)


# ----------------------------------------------------------------- FLOPs
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
        tokenprune.apply(llava, "evit", r=2)
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

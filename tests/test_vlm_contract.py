"""The in-LLM method contract: what ``DecoderLayerContext`` hands a method equals the layer's own attention.

An in-LLM method scores tokens from a pruning layer's queries and keys as its attention uses them: after q/k-norm
where the decoder has one (Qwen3, Gemma 3), then rotated. The reference is the unpatched model's eager attention
map (``output_attentions``), so a context that skipped the norm or the rotary embedding would fail here.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf

import tokenprune
from tests.helpers.vlm_families import LLAVA_ID, LLAVA_IMAGE, PAD, TEXT, llava_pixels, llava_prompt


def build(text: str, attn: str) -> hf.LlavaForConditionalGeneration:
    """A tiny LLaVA on a Llama (no q/k-norm) or Qwen3 (per-head RMS q/k-norm before RoPE) text model."""
    torch.manual_seed(0)
    vision = hf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=LLAVA_IMAGE,
        patch_size=8,
    )  # fmt: skip
    text_config = {
        "llama": lambda: hf.LlamaConfig(**TEXT, max_position_embeddings=256),
        "qwen3": lambda: hf.Qwen3Config(**TEXT, head_dim=16, max_position_embeddings=256),
    }[text]()
    config = hf.LlavaConfig(
        vision_config=vision, text_config=text_config, image_token_id=LLAVA_ID, vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=PAD,
    )  # fmt: skip
    model = hf.LlavaForConditionalGeneration(config).eval()
    if text == "qwen3":  # non-trivial norm weights, so skipping the norm would change every score
        for layer in model.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.data = torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    model.set_attn_implementation(attn)
    return model


@pytest.mark.parametrize("text", ["llama", "qwen3"])
def test_scores_come_from_the_layers_own_normed_rotated_queries_and_keys(text):
    inputs = {"input_ids": torch.tensor([llava_prompt([1, 5, 6], [7, 8, 9, 10])]), "pixel_values": llava_pixels(1)}
    eager = build(text, "eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions  # per layer (1, H, N, N)
    model = build(text, "sdpa")
    method = tokenprune.registry.get_method("fastv")
    patch = tokenprune.apply(model, "fastv", **method.example)
    k = patch.config.k
    contexts = []
    importance = patch.runtime.method.importance
    patch.runtime.method.importance = lambda ctx: contexts.append(ctx) or importance(ctx)
    with torch.no_grad():
        model(**inputs)
    (ctx,) = contexts
    assert ctx.layer == k - 1
    rows, valid = ctx.last_rows()
    got = ctx.attention_rows(rows, valid)[0, 0]  # (N,) the last token's attention, head-averaged
    reference = attentions[k - 1][0, :, -1].float().mean(dim=0)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    patch.remove()

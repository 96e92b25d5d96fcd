"""The README's "Write your own method" code, run exactly as written, and the vision-tower signals contract.

The custom VLM method (defined outside the package with the public base classes) must work on every VLM family of
the test matrix with no adapter change; the custom ViT method on the ViT model forms. Tower signals (what a
pre-LLM method reads with ``tower_layer``) must equal what the tower's own eager attention map says.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenprune
from tests.helpers.recording import patched_run_and_eager_attention
from tests.helpers.vlm_families import FAMILIES, families

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(label: str) -> str:
    """The fenced Python block that follows ``<!-- test: {label} -->`` in the README."""
    match = re.search(rf"<!-- test: {re.escape(label)} -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README has no block labelled {label!r}"
    return match.group(1)


@pytest.fixture
def registered():
    """Run a README block (it registers a method); unregister what it added afterwards."""
    before = set(tokenprune.methods())

    def run(label: str) -> dict:
        namespace: dict = {}
        exec(compile(readme_block(label), f"README:{label}", "exec"), namespace)  # noqa: S102 - our own README
        return namespace

    yield run
    for name in set(tokenprune.methods()) - before:
        tokenprune.unregister_method(name)


@pytest.mark.parametrize("family", FAMILIES)
def test_readme_vlm_method_works_on_every_family(family, registered):
    registered("custom VLM method")
    assert "keep_by_norm" in tokenprune.methods(kind="vlm") and "keep_by_norm" not in tokenprune.methods(kind="vit")
    case = families()[family]
    model, inputs = case.build(), case.inputs(["a"])
    with torch.no_grad():
        expected = model(**inputs).logits
        patch = tokenprune.apply(model, "keep_by_norm", **tokenprune.registry.get_method("keep_by_norm").identity)
        assert torch.equal(model(**inputs).logits, expected) and not patch.state.reduced
        patch.remove()

        patch = tokenprune.apply(model, "keep_by_norm", keep=0.5)
        reduced = model(**inputs).logits
        spans = patch.state.spans[0]
        kept = int(patch.state.visual_in[0][0])
        assert kept == sum(max(1, (n + 1) // 2) for n in spans) < sum(spans)  # half of every span, before the LLM
        assert reduced.shape[1] == expected.shape[1] - (sum(spans) - kept)
        tokens = case.greedy(model, inputs)  # decoding on the compact cache
        assert tokens.shape[1] == inputs["input_ids"].shape[1] + case.steps

        names = list(case.batches[0])  # a padded batch, and a prompt without any image
        model(**case.inputs(names, "left"))
        assert [int(v) for v in patch.state.visual_in[0]] == [
            sum(max(1, (n + 1) // 2) for n in spans) for spans in patch.state.spans
        ]
        text = model(**case.inputs(["text"])).logits
        assert text.shape[1] == len(case.samples["text"]) and not patch.state.reduced
        patch.remove()

        patch = tokenprune.apply(model, "keep_by_norm", flops=0.6)  # solved per prompt, as for the built-ins
        model(**inputs)
        full = patch.adapter.llm_flops.prefill(patch.state.text[0], [sum(patch.state.spans[0])] * case.depth, 1)
        got = sum(row["flops"] for row in patch.adapter.flops_for(patch.state)["layers"])
        assert abs(got / full - 0.6) < 0.05
        patch.remove()
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize(
    "form",
    [
        {"class_token": True},
        {"class_token": False, "global_pool": "avg"},
        {"reg_tokens": 2, "init_values": 1e-5},
    ],
    ids=["cls", "no-cls", "registers-layerscale"],
)
def test_readme_vit_method_works_on_vit_forms(form, registered):
    registered("custom ViT method")
    assert "drop_low_norm" in tokenprune.methods(kind="vit")
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5, **form)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        patch = tokenprune.apply(model, "drop_low_norm", r=0)
        assert torch.equal(model(x), expected)
        patch.remove()
        patch = tokenprune.apply(model, "drop_low_norm", r=2)
        out = model(x)
        assert out.shape == expected.shape
        assert [(e.tokens_in - e.tokens_out) for e in patch.state.log] == [2, 2, 2]
        index = patch.state.index  # (B, N0 - 6): pruned, not merged, so each kept token stands for itself
        assert index.shape[1] == patch.state.num_original - 6
        assert torch.equal(patch.state.size, torch.ones(2, index.shape[1], 1))
        assert bool((index[:, 1:] > index[:, :-1]).all())  # kept positions valid and sorted
        alone = torch.cat([model(x[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(out, alone, rtol=0, atol=1e-5)
        patch.remove()
        patch = tokenprune.apply(model, "drop_low_norm", flops=0.6)
        assert sum(patch.schedule) > 0
        patch.remove()
        assert torch.equal(model(x), expected)


# ----------------------------------------------------------------------------- vision-tower signals
class _Recorder(tokenprune.VisualTokenMethod):
    """Keeps half of each span by tower attention and records every context it received."""

    name = "tower_recorder"
    identity = {"keep": 1.0}
    example = {"keep": 0.5}
    tower_layer = -2
    seen: list = []

    def plan_for(self, depth, value=None):
        return tokenprune.VisualPlan(self.config.keep if value is None else value, (1.0,) * depth)

    def merge(self, ctx):
        type(self).seen.append(ctx)
        return ctx.select(ctx.tower.attention)


@pytest.fixture
def recorder():
    from dataclasses import dataclass

    @dataclass
    class RecorderConfig(tokenprune.VLMReductionConfig):
        keep: float = 0.5

    _Recorder.seen = []
    tokenprune.register_method("tower_recorder", RecorderConfig, _Recorder)
    yield _Recorder
    tokenprune.unregister_method("tower_recorder")


def _patched_run_and_eager_attention(model, tower, inputs) -> tuple:
    """Run the recorder patch on ``inputs``; ``(patch, layer, (I, H, P, P) eager attention of that tower layer)``."""
    return patched_run_and_eager_attention(model, tower, inputs, "tower_recorder", {"keep": 0.5})


@pytest.mark.parametrize("family", ["llava-llama", "idefics3"])
def test_tower_signals_equal_the_towers_own_attention(family, recorder):
    case = families()[family]
    model, inputs = case.build(), case.inputs(["a"])
    tower = model.model.vision_tower if family.startswith("llava") else model.model.vision_model
    patch, layer, attention = _patched_run_and_eager_attention(model, tower, inputs)  # (I, H, P, P)
    (ctx,) = recorder.seen  # one group: every span of this prompt has the same size
    signals = ctx.tower
    assert signals.layer == layer and signals.attention.shape == ctx.embeds.shape[:2]
    if family.startswith("llava"):  # CLIP: the class token's row; LLaVA's "default" strategy drops the class token
        assert signals.from_class_token
        reference = attention[:, :, 0].mean(dim=1)[:, 1:]  # (I, 16)
    else:  # SigLIP-style tower, no class token: mean attention received, then the pixel shuffle's 2 x 2 blocks
        assert not signals.from_class_token
        received = attention.mean(dim=(1, 2)).view(-1, 8, 8)  # (I, 8, 8) patches
        reference = torch.stack(
            [received[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean(dim=(1, 2)) for i in range(4) for j in range(4)],
            dim=1,
        )  # (I, 16) in row-major order of the shuffled grid
    torch.testing.assert_close(signals.attention, reference, rtol=0, atol=1e-5)
    assert signals.keys.shape == (*ctx.embeds.shape[:2], tower.config.hidden_size // tower.config.num_attention_heads)
    assert patch.state.visual_in[0][0] == sum((n + 1) // 2 for n in patch.state.spans[0])
    patch.remove()


def test_tower_signals_refused_where_a_family_does_not_map_them(recorder, monkeypatch):
    from tokenprune.adapters.vlm.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "tower_signals", False)
    with pytest.raises(NotImplementedError, match="does not expose them yet"):
        tokenprune.apply(families()["llava-llama"].build(), "tower_recorder", keep=0.5)


def test_onevision_tower_signals_are_packed_as_hf_packs_the_features(recorder):
    """Anyres: each crop's per-patch attention, unpadded and placed exactly as HF places the crop's features."""
    case = families()["llava-onevision"]
    model, inputs = case.build(), case.inputs(["a"])
    patch, _, attention = _patched_run_and_eager_attention(model, model.model.vision_tower, inputs)
    received = attention.mean(dim=(1, 2))  # (crops, P)
    with torch.no_grad():
        kinds, _ = patch.adapter.image_layouts(inputs["image_sizes"])
        packed, _ = model.model.pack_image_features(
            [received[..., None]], inputs["image_sizes"], image_newline=torch.zeros(1),
            vision_aspect_ratio=model.config.vision_aspect_ratio,
        )  # fmt: skip
    reference = packed[0][:, 0][kinds[0] != 2]  # (visual tokens,): the base grid, then the high-res grid
    by_span = sorted(recorder.seen, key=lambda ctx: ctx.embeds.shape[1])
    got = torch.cat([ctx.tower.attention.flatten() for ctx in by_span])
    sizes = sorted(int((kinds[0] == k).sum()) for k in (0, 1))
    assert [ctx.embeds.shape[1] for ctx in by_span] == sizes
    base, high = reference[: int((kinds[0] == 0).sum())], reference[int((kinds[0] == 0).sum()) :]
    expected = torch.cat([base, high] if len(base) <= len(high) else [high, base])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    patch.remove()
    assert "get_image_features" not in vars(model.model)  # the instance wrapper is gone


def _qwen_case(family: str):
    from tests.helpers.vlm_families import QWEN_IMAGE, QWEN_OPTIONS, QWEN_VIDEO, QwenCase, qwen_samples

    return QwenCase(family, qwen_samples(), (QWEN_IMAGE, QWEN_VIDEO), 3, QWEN_OPTIONS, family=family)


@pytest.fixture
def last_block(recorder):
    """The recorder reading the tower's last block (the tiny Qwen towers have one or two)."""
    recorder.tower_layer = -1
    yield recorder
    recorder.tower_layer = -2


def test_qwen2_vl_tower_signals_equal_the_blocks_own_attention(last_block):
    """Qwen2-VL: mean attention each patch receives within its frame, per LLM token (4 patches), images and video."""
    case = families()["qwen2-vl"]
    model, inputs = case.build(), case.inputs(["mixed"])  # an image and a 3-frame video: two tower runs
    attn = model.model.visual.blocks[-1].attn
    calls = []
    handle = attn.register_forward_pre_hook(lambda m, a, k: calls.append((a[0], dict(k))), with_kwargs=True)
    with torch.no_grad():
        patch = tokenprune.apply(model, "tower_recorder", keep=0.5)
        model(**inputs)
        handle.remove()
        patch.remove()
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        references = []
        for hidden, kwargs in calls:  # by hand: q/k from the block's own qkv and rotary, a softmax per frame
            q, k, _ = attn.qkv(hidden).unflatten(-1, (3, attn.num_heads, -1)).unbind(1)
            q, k = rope(q, k, *kwargs["position_embeddings"])
            bounds = kwargs["cu_seqlens"].tolist()
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                logits = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[a:b].float()) * attn.scaling
                references.append(logits.softmax(dim=-1).mean(dim=(0, 1)).view(-1, 4).mean(dim=1))  # (tokens,)
    assert len(calls) == 2  # the image, then the video
    by_span = {ctx.embeds.shape[1]: ctx for ctx in last_block.seen}  # the image (16 tokens), the frames (8 each)
    assert sorted(by_span) == [8, 16] and not any(ctx.tower.from_class_token for ctx in last_block.seen)
    torch.testing.assert_close(by_span[16].tower.attention[0], references[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(by_span[8].tower.attention, torch.stack(references[1:]), rtol=0, atol=1e-5)
    assert by_span[8].tower.keys.shape == (3, 8, attn.head_dim)


def test_qwen2_5_vl_window_block_signals_come_back_in_image_order(last_block):
    """A windowed block runs its patches in window order; per window, the mean attention received sums to 1."""
    model, inputs = _qwen_case("qwen2.5-windows").build(), _qwen_case("qwen2.5-windows").inputs(["a"])
    with torch.no_grad():
        patch = tokenprune.apply(model, "tower_recorder", keep=0.5)  # block 1 of 2: windows of 3 x 3 tokens
        model(**inputs)
    (ctx,) = last_block.seen
    grid = ctx.tower.attention[0].view(4, 4) * 4  # one 8x8-patch image: 4x4 tokens; x 4: the sum of its patches
    top, bottom = slice(0, 3), slice(3, 4)
    for rows, cols in [(top, top), (top, bottom), (bottom, top), (bottom, bottom)]:  # 9, 3, 3 and 1 tokens
        assert float(grid[rows, cols].sum()) == pytest.approx(1.0, abs=1e-5)
    patch.remove()


@pytest.mark.parametrize("family", ["llava-llama", "llava-onevision", "idefics3", "qwen2-vl", "qwen2.5-vl"])
def test_tower_signals_reach_the_method_in_generate(family, last_block):
    """generate() encodes images before its first forward: the armed capture still hands their signals over."""
    case = families()[family]
    model, inputs = case.build(), case.inputs(["a"])
    with torch.no_grad():
        expected = case.greedy(model, inputs)
        hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # HF adds some lazily
        patch = tokenprune.apply(model, "tower_recorder", keep=0.5)
        tokens = case.greedy(model, inputs)
        assert tokens.shape[1] == inputs["input_ids"].shape[1] + case.steps
        assert last_block.seen and all(ctx.tower is not None for ctx in last_block.seen)
        assert int(patch.state.visual_in[0][0]) == sum((n + 1) // 2 for n in patch.state.spans[0])
        patch.remove()
        assert torch.equal(case.greedy(model, inputs), expected)  # every capture hook and wrapper gone
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert not any("get_image_features" in vars(m) for m in model.modules())


def test_tower_signals_on_a_dinov2_tower(recorder):
    """LLaVA with a DINOv2 tower (as the shipped llava-easyvqa): class-token attention of its own layer."""
    import transformers as hf

    from tests.helpers.vlm_families import LLAVA_ID, PAD, TEXT, llava_pixels, llava_prompt

    torch.manual_seed(0)
    vision = hf.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    config = hf.LlavaConfig(
        vision_config=vision, text_config=hf.LlamaConfig(**TEXT), image_token_id=LLAVA_ID, vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=PAD,
    )  # fmt: skip
    model = hf.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    inputs = {"input_ids": torch.tensor([llava_prompt([1, 5], [7, 8])]), "pixel_values": llava_pixels(1)}
    patch, layer, attention = _patched_run_and_eager_attention(model, model.model.vision_tower, inputs)
    (ctx,) = recorder.seen
    assert ctx.tower.from_class_token and ctx.tower.layer == layer
    torch.testing.assert_close(ctx.tower.attention, attention[:, :, 0].mean(dim=1)[:, 1:], rtol=0, atol=1e-5)
    patch.remove()


@pytest.mark.parametrize("family", ["llava-llama", "qwen2-vl"])
def test_a_tower_call_of_its_own_before_a_forward_is_skipped(family, last_block):
    """The capture keeps every tower run; a stale one (e.g. a FLOPs probe of the tower alone) is not used."""
    case = families()[family]
    model, inputs = case.build(), case.inputs(["a"])
    with torch.no_grad():
        patch = tokenprune.apply(model, "tower_recorder", keep=0.5)
        model(**inputs)
        expected = last_block.seen[-1].tower.attention
        other = case.inputs(["b"])  # another image through the tower alone
        extra = {k: v for k, v in other.items() if k in ("pixel_values", "image_grid_thw")}
        model.model.get_image_features(**extra)
        model(**inputs)
        torch.testing.assert_close(last_block.seen[-1].tower.attention, expected, rtol=0, atol=0)
    patch.remove()

"""eval/published_sizes.py: its analytic LLM table against torch's flop counter, its visual-token counts against
Hugging Face's own processors, and the LLaVA-1.5-7B row against hand formulas.

* Every VLM family's tiny model (``tests/helpers/vlm_families.py``): the script's LLM table (the adapter's
  ``llm_flops``) equals ``FlopCounterMode`` on the text model, at the unreduced and at a reduced length.
* Every published checkpoint's text model, shrunk to 2 layers (same class and layer layout, e.g. Gemma 3 and
  Qwen3-VL): the ``DecoderFlops`` the script builds equals the flop counter, so the published rows of families
  without an adapter rest on a checked table too.
* The visual tokens of each typical image: HF's processors (image processors run on a blank image, or the LLaVA
  processors' own counting methods) give the same counts as the script's formulas.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as hf
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers.vlm_families import families
from tokenprune import registry
from tokenprune.adapters.vlm.flops import DecoderFlops
from tokenprune.adapters.vlm.layer import DecoderSpec

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("published_sizes", ROOT / "eval" / "published_sizes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


ps = _load_script()
CHECKPOINTS = {c.name: c for c in ps.CHECKPOINTS}


def counted(language_model: torch.nn.Module, tokens: int) -> float:
    """FLOPs ``torch.utils.flop_counter`` measures for the text model's forward on ``tokens`` embeddings.

    Models run with eager attention: the stock counter does not know the CPU fused-attention kernel, and eager
    attention's matmuls are what it counts without help.
    """
    hidden = language_model.config.hidden_size
    embeds = torch.randn(1, tokens, hidden)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        language_model(inputs_embeds=embeds, use_cache=False)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- analytic table vs flop counter
@pytest.mark.parametrize("name", list(families()))
def test_llm_table_equals_the_flop_counter_on_tiny_families(name):
    model = families()[name].build("eager")  # attention as matmuls: the stock counter sees QK^T and AV
    side = ps.llm(model)
    assert side.supported.startswith("yes"), side.supported  # every family case has its adapter
    text = 9
    for visual in (16, 5):  # unreduced and reduced before the LLM
        analytic = side.prefill(text, visual)
        assert analytic == pytest.approx(counted(side.language_model, text + visual), rel=0.02)


def tiny_text_model(checkpoint) -> torch.nn.Module:
    """The checkpoint's text-model class with 2 layers, 2 query / 1 key-value heads, its own head_dim."""
    text_config = getattr(hf, checkpoint.cls).config_class(**checkpoint.config).text_config
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    small = {
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "hidden_size": 2 * head_dim,  # keeps head_dim (and with it M-RoPE's sections) valid
        "intermediate_size": 96,
        "vocab_size": 128,
    }
    if getattr(text_config, "layer_types", None):  # the first two layers' kinds (Gemma 3: sliding ones)
        small["layer_types"] = text_config.layer_types[:2]
    if getattr(text_config, "head_dim", None) is not None:
        small["head_dim"] = head_dim
    config = type(text_config)(**{**text_config.to_dict(), **small})
    torch.manual_seed(0)
    return hf.AutoModel.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_decoder_flops_equal_the_flop_counter_on_each_checkpoints_text_model(name):
    text_model = tiny_text_model(CHECKPOINTS[name])
    flops = DecoderFlops(text_model, DecoderSpec())
    for tokens in (23, 7):
        analytic = flops.prefill(tokens, [0] * flops.depth, rows=0)
        assert analytic == pytest.approx(counted(text_model, tokens), rel=0.02)


# ----------------------------------------------------------------------------- the 7B LLaVA-1.5 row by hand
@pytest.fixture(scope="module")
def llava_row():
    return ps.measure(CHECKPOINTS["LLaVA-1.5-7B"])


def test_llava_15_7b_row_is_the_hand_formula(llava_row):
    row = llava_row
    layers, hidden, mlp, heads = 32, 4096, 11008, 32
    dims = (row["layers"], row["hidden_size"], row["heads"], row["kv_heads"], row["head_dim"])
    assert dims == (layers, hidden, heads, heads, hidden // heads)  # multi-head: 32 kv heads of 128
    assert row["visual_tokens"] == 576 and row["layout_tokens"] == 0
    params = layers * (4 * hidden * hidden + 3 * hidden * mlp)  # q, k, v, o + gate, up, down (no biases)
    assert row["llm_linear_params"] == params
    tflops = row["prefill_tflops"]
    for setting, visual in (("unreduced", 576), ("192/576", 192), ("128/576", 128), ("64/576", 64)):
        tokens = 40 + visual
        assert tflops[setting] * 1e12 == pytest.approx(2 * params * tokens, rel=0.05)  # attention adds ~2.5%
        exact = 2 * params * tokens + layers * 4 * tokens * tokens * hidden  # + QK^T and AV over all heads
        assert tflops[setting] * 1e12 == pytest.approx(exact, rel=1e-12)
    assert row["kept_tokens"] == {"192/576": 192, "128/576": 128, "64/576": 64}
    per_token = layers * 2 * 32 * 128 * 2  # K and V, 32 kv heads x 128, bf16
    assert row["kv_mb_visual"] == pytest.approx(per_token * 576 / 1e6)
    assert row["kv_mb_saved"]["64/576"] == pytest.approx(per_token * 512 / 1e6)
    assert row["tokenprune"] == "yes (LlavaAdapter)"


def test_support_is_read_from_the_registry(monkeypatch):
    model = ps.build_meta(CHECKPOINTS["LLaVA-1.5-7B"])
    monkeypatch.setattr(registry, "_ADAPTERS", [])
    adapter, supported = ps.support(model)
    assert adapter is None and supported.startswith("no (0 vlm adapters registered")
    side = ps.llm(model)  # still measured from the text model
    assert side.flops.depth == 32


def test_kept_tokens_are_the_fractions_of_each_image():
    assert [ps.kept(999, k) for k in ps.KEEPS] == [333, 222, 111]
    assert [ps.kept(256, k) for k in ps.KEEPS] == [85, 57, 28]


# ----------------------------------------------------------------------------- visual tokens vs HF processors
PHOTO = np.zeros((*ps.PHOTO, 3), dtype=np.uint8)  # (768, 1024, 3)


def _bound(cls, **attributes):
    """A stand-in ``self`` for a processor's counting methods (no tokenizer needed)."""
    self = SimpleNamespace(**attributes)
    self._get_unpadded_features = functools.partial(cls._get_unpadded_features, self)
    return self


def test_llava_next_tokens_match_hf_processor():
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = _bound(
        LlavaNextProcessor,
        image_processor=SimpleNamespace(image_grid_pinpoints=ps.NEXT_PINPOINTS),
        patch_size=14,
        num_additional_image_tokens=1,
    )
    expected = LlavaNextProcessor._get_number_of_features(proc, 672, 672, 336, 336) - 1  # "default": no CLS
    checkpoint = CHECKPOINTS["LLaVA-NeXT-7B (Mistral)"]
    assert checkpoint.visual + checkpoint.layout == expected == 2928
    for height, width in ((768, 1024), (500, 1400), (1400, 300)):
        visual, newlines = ps.anyres_tokens(height, width, ps.NEXT_PINPOINTS, 336, 14)
        assert visual + newlines == LlavaNextProcessor._get_number_of_features(proc, height, width, 336, 336) - 1


def test_llava_onevision_tokens_match_hf_processor():
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = _bound(
        LlavaOnevisionProcessor,
        image_processor=SimpleNamespace(image_grid_pinpoints=ps.OV_PINPOINTS),
        num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9",
    )
    checkpoint = CHECKPOINTS["LLaVA-OneVision-7B"]
    assert checkpoint.visual + checkpoint.layout == LlavaOnevisionProcessor._get_number_of_features(
        proc, *ps.PHOTO, 384, 384
    )
    for height, width in ((2304, 2304), (500, 1400), (1400, 300)):  # the first shrinks a 6x6 grid (anyres_max_9)
        visual, newlines = ps.anyres_tokens(height, width, ps.OV_PINPOINTS, 384, 14, max_tiles=9)
        assert visual + newlines == LlavaOnevisionProcessor._get_number_of_features(proc, height, width, 384, 384)


@pytest.mark.parametrize(
    ("name", "processor", "patch", "merge"),
    [
        ("Qwen2.5-VL-7B", {"min_pixels": 3136, "max_pixels": 12845056}, 14, 2),
        ("Qwen3-VL-8B", {"size": {"shortest_edge": 65536, "longest_edge": 16777216}}, 16, 2),
    ],
)
def test_qwen_tokens_match_hf_image_processor(name, processor, patch, merge):
    out = hf.Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, **processor)(PHOTO, return_tensors="pt")
    assert CHECKPOINTS[name].visual == int(out["image_grid_thw"].prod()) // merge**2


def test_internvl_tiles_match_hf_image_processor():
    processor = hf.GotOcr2ImageProcessor(
        crop_to_patches=True, min_patches=1, max_patches=12, size={"height": 448, "width": 448}
    )
    assert CHECKPOINTS["InternVL3-8B"].visual == int(processor(PHOTO, return_tensors="pt")["num_patches"]) * 256
    for height, width in ((448, 448), (300, 1400), (896, 896)):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        assert ps.internvl_tiles(height, width, 12) == int(processor(image, return_tensors="pt")["num_patches"])


def test_smolvlm_tiles_match_hf_image_processor():
    processor = hf.SmolVLMImageProcessor(
        do_image_splitting=True, size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}
    )
    tiles = processor(PHOTO, return_tensors="pt")["pixel_values"].shape[1]
    assert CHECKPOINTS["SmolVLM-256M"].visual == tiles * 64 == ps.idefics3_tiles(*ps.PHOTO, 2048, 512)[0] * 64


def test_pixtral_tokens_match_hf_image_processor():
    # PixtralProcessor resizes with patch_size x spatial_merge_size (14 x 2), one [IMG] per 28 x 28 pixels.
    processor = hf.PixtralImageProcessor(patch_size={"height": 28, "width": 28}, size={"longest_edge": 1540})
    for height, width in (ps.PHOTO, (2000, 900), (300, 3000)):
        image = np.zeros((height, width, 3), dtype=np.uint8)
        resized_h, resized_w = processor(image, return_tensors="pt")["image_sizes"][0].tolist()
        assert ps.pixtral_tokens(height, width, 14, 2, 1540) == ((resized_h // 28) * (resized_w // 28), resized_h // 28)
    assert CHECKPOINTS["Mistral-Small-3.1-24B"].visual == 1036

"""What visual-token reduction saves on the real published checkpoints: prefill FLOPs and KV cache per image.

Issue 15, "the real published sizes". Each checkpoint's model class is built at its published size on the meta
device (no weights, nothing downloaded): the dimensions from its ``config.json`` are literals below, each entry
naming the checkpoint and whether its numbers were confirmed against a copy of that config.json found with the
search tools or written from memory. The LLM prefill FLOPs (2 x MAC) come from tokenprune's own analytic
per-layer table (:class:`~tokenprune.adapters.vlm.flops.DecoderFlops`, what every adapter's ``llm_flops`` is),
built from the meta model's language model; ``tests/test_published_sizes.py`` checks that table against
``torch.utils.flop_counter`` on tiny models of every family.

Per checkpoint:

* the visual tokens of one typical image (the image size is stated; dynamic-resolution families get a 1024x768
  photo), counted as each family's processor counts them, plus its *layout* tokens (row newlines, row breaks,
  begin/end markers, tile labels) that stay in the prompt whatever is removed;
* LLM prefill TFLOPs of that image and a 40-token prompt: unreduced, and with 192 / 128 / 64 of every 576 visual
  tokens kept (the fractions 1/3, 2/9, 1/9 of each image's tokens, LLaVA-1.5's usual settings), removed before
  the first LLM layer (a pre-LLM method: every layer runs on the kept tokens; no scoring overhead counted);
* the bf16 KV cache of the image's visual tokens and what each setting saves:
  ``layers x 2 (K and V) x kv_heads x head_dim x 2 bytes x removed tokens`` (MB = 10^6 bytes);
* whether tokenprune supports the family today, read from ``tokenprune.registry.adapters("vlm")`` at run time:
  the adapter that matches the model, or why none does. Families without an adapter (or whose adapter refuses the
  model) still get numbers from ``DecoderFlops`` on their text model, whose layer layout is the same
  (``self_attn`` + ``mlp`` with linear projections).

Caveats, by family: Gemma 3 runs 5 of every 6 layers with a 1024-token sliding window; the prompts here are
shorter than the window, so those layers attend to (and cache) every token, as the table assumes. Qwen3-VL adds
DeepStack features to the first LLM layers' hidden states (elementwise, no matmul FLOPs); a removed token's
DeepStack features go with it.

Writes eval/results/published_sizes.{json,md}. Run: python eval/published_sizes.py
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as hf
from torch import nn
from transformers.image_processing_utils import select_best_resolution
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

import tokenprune.adapters.vlm  # noqa: F401  (registers the families)
from tokenprune import registry
from tokenprune.adapters.base import linear_macs
from tokenprune.adapters.vlm.flops import DecoderFlops
from tokenprune.adapters.vlm.layer import DecoderSpec

RESULTS = Path(__file__).parent / "results"
TEXT_TOKENS = 40  # a typical question with its chat template
KEEPS = (192, 128, 64)  # visual tokens kept per 576
PER = 576
BF16_BYTES = 2
PHOTO = (768, 1024)  # (height, width) of the typical photo given to dynamic-resolution families

# LLaVA-NeXT's grid pinpoints (llava-v1.6-*-hf config.json) and LLaVA-OneVision's (384 x 1..6 each way).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


# ----------------------------------------------------------------------------- visual tokens, per family
def anyres_tokens(
    height: int, width: int, pinpoints: list[list[int]], tile: int, patch: int, max_tiles: int | None = None
) -> tuple[int, int]:
    """``(visual, newlines)`` of one LLaVA-NeXT / LLaVA-OneVision anyres image, as HF's processors count them.

    The base image (``(tile / patch)^2`` features) plus the best pinpoint's grid of tiles, unpadded back to the
    image's aspect ratio, one newline token per grid row; OneVision's ``anyres_max_N`` shrinks a grid above
    ``N`` tiles' worth of features (``max_tiles``).
    """
    best_h, best_w = select_best_resolution([height, width], pinpoints)
    side = tile // patch
    rows, cols = side * (best_h // tile), side * (best_w // tile)
    if width / height > cols / rows:  # wider than the grid: padding rows removed
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    if max_tiles is not None:
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols, rows


def qwen_tokens(height: int, width: int, patch: int, merge: int, min_pixels: int, max_pixels: int) -> int:
    """Qwen2.5-VL / Qwen3-VL: the image resized by HF's ``smart_resize``, then one token per ``merge^2`` patches."""
    factor = patch * merge
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)


def internvl_tiles(height: int, width: int, max_tiles: int, min_tiles: int = 1, tile: int = 448) -> int:
    """InternVL's dynamic tiling: the ``cols x rows`` grid (``min_tiles`` to ``max_tiles`` tiles) of closest aspect
    ratio (a tie goes to the larger grid when the image has over half its pixels), plus a thumbnail tile when the
    grid has more than one."""
    aspect = width / height
    grids = sorted(
        {(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if min_tiles <= i * j <= max_tiles},
        key=lambda grid: grid[0] * grid[1],
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    tiles = best[0] * best[1]
    return tiles + (tiles > 1)


def idefics3_tiles(height: int, width: int, longest_edge: int, tile: int) -> tuple[int, int]:
    """``(tiles, rows)`` of SmolVLM / Idefics3 image splitting: resized to ``longest_edge`` (aspect kept), rounded
    up to whole ``tile`` tiles, split into them, plus one global tile when split."""
    scale = longest_edge / max(height, width)
    rows = math.ceil(round(height * scale) / tile)
    cols = math.ceil(round(width * scale) / tile)
    split = rows * cols
    return split + (split > 1), rows


def pixtral_tokens(height: int, width: int, patch: int, merge: int, longest_edge: int) -> tuple[int, int]:
    """``(visual, rows)`` of a Pixtral-tower image (Mistral 3): scaled down to fit ``longest_edge``, then one
    ``[IMG]`` per ``merge x merge`` patches, each row ended by ``[IMG_BREAK]`` (the last by ``[IMG_END]``)."""
    ratio = max(height / longest_edge, width / longest_edge, 1.0)
    step = patch * merge
    rows = math.ceil(int(height / ratio) / step)
    cols = math.ceil(int(width / ratio) / step)
    return rows * cols, rows


# ----------------------------------------------------------------------------- the checkpoints
@dataclass
class Checkpoint:
    """One published checkpoint: its model class, config.json dimensions, typical image and its visual tokens.

    Attributes:
        name: Short name for tables.
        repo: The Hugging Face checkpoint the dimensions are from.
        cls: The transformers model class.
        config: Keyword arguments of ``cls.config_class`` (the config.json fields that fix the sizes).
        image: The typical image, in words.
        visual: Visual tokens of that image (what a method may remove).
        layout: Layout tokens of that image (newlines, breaks, markers, tile labels; never removed).
        source: Where the dimensions were checked.
    """

    name: str
    repo: str
    cls: str
    config: dict[str, Any]
    image: str
    visual: int
    layout: int
    source: str
    notes: list[str] = field(default_factory=list)


LLAMA2_7B = {  # Llama-2-7B / Vicuna-7B-v1.5 text model (LLaVA-1.5's vocabulary: 32000 + image token + pad)
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}
CLIP_L_336 = {  # openai/clip-vit-large-patch14-336
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
QWEN25_7B = {  # Qwen2.5-7B text model (shared by Qwen2.5-VL-7B, InternVL3-8B and LLaVA-OneVision-7B's Qwen2-7B)
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}
MISTRAL_40L = {  # the 40-layer, 5120-wide Mistral text model of Mistral-Small-3.1-24B and Pixtral-12B (Mistral-NeMo)
    "model_type": "mistral",
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 131072,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e9},
}
PIXTRAL_VIT = {  # Pixtral's vision encoder (Mistral-Small-3.1 and Pixtral-12B; image and patch size differ)
    "model_type": "pixtral",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "head_dim": 64,
}
INTERNVIT_300M = {  # InternViT-300M-448px-V2.5 as InternVLForConditionalGeneration's vision_config
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": [448, 448],
    "patch_size": [14, 14],
    "use_qk_norm": False,
    "layer_scale_init_value": 0.1,
}

_NEXT_VISUAL, _NEXT_NEWLINES = anyres_tokens(672, 672, NEXT_PINPOINTS, 336, 14)
_OV_VISUAL, _OV_NEWLINES = anyres_tokens(*PHOTO, OV_PINPOINTS, 384, 14, max_tiles=9)
_INTERN_TILES = internvl_tiles(*PHOTO, max_tiles=12)
_SMOL_TILES, _SMOL_ROWS = idefics3_tiles(*PHOTO, longest_edge=2048, tile=512)
_PIXTRAL_VISUAL, _PIXTRAL_ROWS = pixtral_tokens(*PHOTO, patch=14, merge=2, longest_edge=1540)
_PIXTRAL12_VISUAL, _PIXTRAL12_ROWS = pixtral_tokens(*PHOTO, patch=16, merge=1, longest_edge=1024)
_PHOTO_TEXT = f"{PHOTO[1]}x{PHOTO[0]} photo"

CHECKPOINTS = [
    Checkpoint(
        "LLaVA-1.5-7B",
        "llava-hf/llava-1.5-7b-hf",
        "LlavaForConditionalGeneration",
        {
            "text_config": LLAMA2_7B,
            "vision_config": CLIP_L_336,
            "image_token_index": 32000,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
        },
        "336x336 (any image is resized to it)",
        (336 // 14) ** 2,
        0,
        "confirmed: text and vision dimensions as a third-party copy of the llava-1.5-7b config lists them",
    ),
    Checkpoint(
        "LLaVA-NeXT-7B (Mistral)",
        "llava-hf/llava-v1.6-mistral-7b-hf",
        "LlavaNextForConditionalGeneration",
        {
            "text_config": {  # Mistral-7B-Instruct-v0.2
                "model_type": "mistral",
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 32064,
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-5,
                "sliding_window": None,
            },
            "vision_config": CLIP_L_336,
            "image_grid_pinpoints": NEXT_PINPOINTS,
            "image_token_index": 32000,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
        },
        "672x672 anyres: base 336 view + 2x2 tiles",
        _NEXT_VISUAL,
        _NEXT_NEWLINES,
        "from memory (Mistral-7B shape as third-party configs list it; grid pinpoints from memory)",
    ),
    Checkpoint(
        "LLaVA-OneVision-7B",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "LlavaOnevisionForConditionalGeneration",
        {
            "text_config": {"model_type": "qwen2", **QWEN25_7B, "vocab_size": 152128, "max_position_embeddings": 32768},
            "vision_config": {  # SigLIP so400m-patch14-384, its last layer dropped (HF keeps 26 of 27)
                "model_type": "siglip_vision_model",
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 26,
                "num_attention_heads": 16,
                "image_size": 384,
                "patch_size": 14,
                "vision_use_head": False,
            },
            "image_grid_pinpoints": OV_PINPOINTS,
            "vision_aspect_ratio": "anyres_max_9",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "image_token_index": 151646,
        },
        f"{_PHOTO_TEXT}, anyres_max_9: base 384 view + 2x3 tiles, unpadded",
        _OV_VISUAL,
        _OV_NEWLINES,
        "from memory (Qwen2-7B shape confirmed by third-party Qwen2/2.5-7B configs; SigLIP depth and vocab "
        "from memory)",
    ),
    Checkpoint(
        "Qwen2.5-VL-7B",
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen2_5_VLForConditionalGeneration",
        {
            "text_config": {
                **QWEN25_7B,
                "vocab_size": 152064,
                "max_position_embeddings": 128000,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            },
            "vision_config": {
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
        },
        f"{_PHOTO_TEXT} (min_pixels 3136, max_pixels 12845056)",
        qwen_tokens(*PHOTO, patch=14, merge=2, min_pixels=3136, max_pixels=12845056),
        2,  # <|vision_start|> <|vision_end|>
        "confirmed: text dimensions from a Qwen2.5-VL-7B-derived config.json, vision from a third-party "
        "Qwen2.5-VL vision config class",
    ),
    Checkpoint(
        "Qwen3-VL-8B",
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen3VLForConditionalGeneration",
        {
            "text_config": {
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "num_hidden_layers": 36,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "vocab_size": 151936,
                "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5e6,
                    "mrope_section": [24, 20, 20],
                    "mrope_interleaved": True,
                },
            },
            "vision_config": {
                "depth": 27,
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_heads": 16,
                "out_hidden_size": 4096,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [8, 16, 24],
            },
            "tie_word_embeddings": False,
        },
        f"{_PHOTO_TEXT} (patch 16, merge 2; shortest_edge 65536, longest_edge 16777216 pixels)",
        qwen_tokens(*PHOTO, patch=16, merge=2, min_pixels=65536, max_pixels=16777216),
        2,  # <|vision_start|> <|vision_end|>
        "confirmed: several third-party copies of the Qwen3-VL-8B-Instruct config.json (processor pixel "
        "limits from memory)",
    ),
    Checkpoint(
        "Gemma-3-4B",
        "google/gemma-3-4b-it",
        "Gemma3ForConditionalGeneration",
        {
            "text_config": {
                "hidden_size": 2560,
                "intermediate_size": 10240,
                "num_hidden_layers": 34,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "vocab_size": 262208,
                "sliding_window": 1024,
                "query_pre_attn_scalar": 256,
            },
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "image_size": 896,
                "patch_size": 14,
                "vision_use_head": False,
            },
            "mm_tokens_per_image": 256,
            "boi_token_index": 255999,
            "eoi_token_index": 256000,
            "image_token_index": 262144,
        },
        "896x896 (pan-and-scan off), pooled to mm_tokens_per_image",
        256,
        2,  # <start_of_image> <end_of_image>
        "confirmed: third-party copies of the gemma-3-4b-it config.json (dimensions and mm_tokens_per_image)",
        ["5 of 6 layers slide a 1024-token window: shorter prompts than that attend to and cache every token"],
    ),
    Checkpoint(
        "InternVL3-8B",
        "OpenGVLab/InternVL3-8B-hf",
        "InternVLForConditionalGeneration",
        {
            "text_config": {"model_type": "qwen2", **QWEN25_7B, "vocab_size": 151674},
            "vision_config": INTERNVIT_300M,
            "downsample_ratio": 0.5,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "image_token_id": 151667,
        },
        f"{_PHOTO_TEXT}: 448x448 tiles (max 12) + thumbnail, 256 tokens each",
        _INTERN_TILES * 256,
        2,  # <img> </img>
        "partly confirmed: 256 tokens per 448 tile, downsample 0.5, image token 151667 and vocab 151674 from "
        "third-party InternVL3 configs/issues; Qwen2.5-7B text and InternViT-300M dimensions confirmed for "
        "sibling configs, their pairing in InternVL3-8B from memory",
    ),
    Checkpoint(
        "SmolVLM-256M",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        "SmolVLMForConditionalGeneration",
        {
            "text_config": {
                "model_type": "llama",
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "vocab_size": 49280,
                "max_position_embeddings": 8192,
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            },
            "vision_config": {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "image_size": 512,
                "patch_size": 16,
            },
            "scale_factor": 4,
            "image_token_id": 49190,
        },
        f"{_PHOTO_TEXT}: resized to longest edge 2048, 512x512 tiles + global view, 64 tokens each",
        _SMOL_TILES * 64,
        2 * _SMOL_TILES + _SMOL_ROWS + 1,  # per tile <fake_token_around_image> + label, row "\n"s, end marker
        "confirmed: a third-party copy of an Idefics3-format config with these dimensions (576/30 layers/9:3 heads, "
        "SigLIP-B 512/16, scale_factor 4); the processor's longest_edge 2048 from memory",
    ),
    Checkpoint(
        "Mistral-Small-3.1-24B",
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        "Mistral3ForConditionalGeneration",
        {
            "text_config": MISTRAL_40L | {"intermediate_size": 32768, "max_position_embeddings": 131072},
            "vision_config": PIXTRAL_VIT | {"image_size": 1540, "patch_size": 14},
            "spatial_merge_size": 2,
            "multimodal_projector_bias": False,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "image_token_index": 10,
        },
        f"{_PHOTO_TEXT} (patch 14, 2x2 merge, longest edge 1540)",
        _PIXTRAL_VISUAL,
        _PIXTRAL_ROWS,  # one [IMG_BREAK] per row, the last row's an [IMG_END]
        "confirmed: third-party copies of the Mistral-Small-3.1-24B-Instruct-2503 config.json",
    ),
    Checkpoint(
        "Pixtral-12B",
        "mistral-community/pixtral-12b",
        "LlavaForConditionalGeneration",
        {
            "text_config": MISTRAL_40L | {"intermediate_size": 14336, "max_position_embeddings": 1024000},
            "vision_config": PIXTRAL_VIT | {"image_size": 1024, "patch_size": 16},
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "image_token_id": 10,
        },
        f"{_PHOTO_TEXT} (patch 16, no merger, longest edge 1024)",
        _PIXTRAL12_VISUAL,
        _PIXTRAL12_ROWS,  # one [IMG_BREAK] per row, the last row's an [IMG_END]
        "from memory (Mistral-NeMo-12B text model, Pixtral-ViT 400M at patch 16); not confirmed against its "
        "config.json",
    ),
]


# ----------------------------------------------------------------------------- building and measuring
def build_meta(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's model class at its published size on the meta device (no memory, no weights)."""
    cls = getattr(hf, checkpoint.cls)
    config = cls.config_class(**checkpoint.config)
    with torch.device("meta"):
        return cls(config)


def support(model: nn.Module) -> tuple[Any, str]:
    """``(adapter or None, what tokenprune says today)``: the registered adapter that matches and accepts it."""
    registered = registry.adapters("vlm")
    try:
        adapter_cls = registry.find_adapter(model)
    except TypeError:
        return None, f"no ({len(registered)} vlm adapters registered, none for {type(model).__name__})"
    if adapter_cls.kind != "vlm":
        return None, f"no (only a {adapter_cls.kind} adapter matches)"
    try:
        adapter = adapter_cls(model)
    except (TypeError, NotImplementedError, ValueError) as error:
        return None, f"adapter {adapter_cls.__name__} refuses it: {error}"
    return adapter, f"yes ({adapter_cls.__name__})"


@dataclass
class LLM:
    """A model's text model, its analytic per-layer FLOPs table and tokenprune's support for the model."""

    language_model: nn.Module
    flops: DecoderFlops
    supported: str

    @property
    def kv_heads(self) -> int:
        config = self.language_model.config
        return config.num_key_value_heads or config.num_attention_heads

    def prefill(self, text: int, visual: int) -> float:
        """LLM prefill FLOPs of ``text`` tokens and ``visual`` visual tokens in every layer (pre-LLM reduction)."""
        return self.flops.prefill(text, [visual] * self.flops.depth, rows=0)

    def kv_bytes(self, tokens: int) -> int:
        """bf16 KV cache of ``tokens`` tokens: layers x 2 x kv_heads x head_dim x 2 bytes x tokens."""
        return self.flops.depth * 2 * self.kv_heads * self.flops.head_dim * BF16_BYTES * tokens


def llm(model: nn.Module) -> LLM:
    """The model's LLM side: the adapter's text model and ``llm_flops`` where tokenprune supports the model, else
    transformers 5's ``model.language_model`` with a :class:`DecoderFlops` built the way adapters build theirs."""
    adapter, supported = support(model)
    if adapter is not None:
        return LLM(adapter.language_model, adapter.llm_flops, supported)
    inner = getattr(model, "model", model)
    text_model = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    if text_model is None or not hasattr(text_model, "layers"):
        raise TypeError(f"{type(model).__name__} has no model.language_model / model.text_model with layers")
    return LLM(text_model, DecoderFlops(text_model, DecoderSpec()), supported)


def kept(visual: int, keep: int) -> int:
    """Visual tokens kept at ``keep`` per 576."""
    return round(visual * keep / PER)


def measure(checkpoint: Checkpoint) -> dict[str, Any]:
    """One checkpoint's row: sizes, support, visual tokens, prefill FLOPs and KV bytes."""
    side = llm(build_meta(checkpoint))
    flops = side.flops
    text = TEXT_TOKENS + checkpoint.layout
    row: dict[str, Any] = {
        "name": checkpoint.name,
        "checkpoint": checkpoint.repo,
        "class": checkpoint.cls,
        "tokenprune": side.supported,
        "config_source": checkpoint.source,
        "layers": flops.depth,
        "hidden_size": flops.hidden_size,
        "heads": flops.num_heads,
        "kv_heads": side.kv_heads,
        "head_dim": flops.head_dim,
        "llm_linear_params": sum(linear_macs(layer) for layer in side.language_model.layers),
        "image": checkpoint.image,
        "visual_tokens": checkpoint.visual,
        "layout_tokens": checkpoint.layout,
        "text_tokens": TEXT_TOKENS,
        "prefill_tflops": {"unreduced": side.prefill(text, checkpoint.visual) / 1e12},
        "kept_tokens": {},
        "kv_mb_visual": side.kv_bytes(checkpoint.visual) / 1e6,
        "kv_mb_saved": {},
        "notes": checkpoint.notes,
    }
    for keep in KEEPS:
        n = kept(checkpoint.visual, keep)
        row["kept_tokens"][f"{keep}/{PER}"] = n
        row["prefill_tflops"][f"{keep}/{PER}"] = side.prefill(text, n) / 1e12
        row["kv_mb_saved"][f"{keep}/{PER}"] = side.kv_bytes(checkpoint.visual - n) / 1e6
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The two tables (sizes and support; FLOPs and KV cache) and the notes."""
    settings = [f"{k}/{PER}" for k in KEEPS]
    lines = [
        "# Visual-token reduction on the published checkpoints",
        "",
        f"Built on the meta device from each config.json's dimensions (`python eval/published_sizes.py`). Prompt: "
        f"{TEXT_TOKENS} text tokens + one image; reduction before the first LLM layer, keeping 192 / 128 / 64 of "
        "every 576 visual tokens (1/3, 2/9, 1/9); layout tokens (newlines, breaks, markers) always kept. FLOPs = "
        "2 x MAC of the LLM prefill (tokenprune's analytic per-layer table; no LM head, no vision tower). KV: bf16, "
        "MB = 10^6 bytes.",
        "",
        "| checkpoint | class | tokenprune today | LLM layers / hidden / heads (kv) x head_dim | image | visual "
        "tokens (+layout) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} (`{r['checkpoint']}`) | {r['class']} | {r['tokenprune']} | {r['layers']} / "
            f"{r['hidden_size']} / {r['heads']} ({r['kv_heads']}) x {r['head_dim']} | {r['image']} | "
            f"{r['visual_tokens']} (+{r['layout_tokens']}) |"
        )
    lines += [
        "",
        "| checkpoint | prefill TFLOPs unreduced | " + " | ".join(f"TFLOPs at {s} (kept)" for s in settings) + " | "
        "visual KV MB | " + " | ".join(f"KV MB saved at {s}" for s in settings) + " |",
        "|---|" + "---:|" * (2 + 2 * len(settings)),
    ]
    for r in rows:
        tf = r["prefill_tflops"]
        reduced = [f"{tf[s]:.2f} ({r['kept_tokens'][s]}, {tf[s] / tf['unreduced']:.0%})" for s in settings]
        saved = [f"{r['kv_mb_saved'][s]:.0f}" for s in settings]
        lines.append(
            f"| {r['name']} | {tf['unreduced']:.2f} | "
            + " | ".join(reduced)
            + f" | {r['kv_mb_visual']:.0f} | "
            + " | ".join(saved)
            + " |"
        )
    lines += ["", "Config sources (confirmed with the search tools, or from memory):", ""]
    lines += [f"- {r['name']}: {r['config_source']}." for r in rows]
    notes = [f"- {r['name']}: {n}." for r in rows for n in r["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = [measure(checkpoint) for checkpoint in CHECKPOINTS]
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "text_tokens": TEXT_TOKENS,
        "keeps_per_576": list(KEEPS),
        "reduction": "pre-LLM: every LLM layer runs on the kept visual tokens; layout tokens always kept",
        "flops": "2 x MAC, LLM prefill only (DecoderFlops: decoder layers, no LM head, no vision tower)",
        "kv": "bf16, layers x 2 x kv_heads x head_dim x 2 bytes x tokens, MB = 1e6 bytes",
        "transformers": hf.__version__,
        "torch": torch.__version__,
    }
    (RESULTS / "published_sizes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "published_sizes.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()

"""One case per vision-language family: how to build its tiny random-weight model and its inputs.

Every model is built from a config (nothing is downloaded): a small vision tower, and a text model of hidden 64,
4 layers, GQA 4/2 heads, vocab 200, with a larger-than-default init (peaky attention: rankings far from ties).
A case names its prompts (``samples``): ``"a"`` and ``"b"`` hold images of different layouts or sizes,
``"text"`` none; families with video add ``"video"`` (a video alone) and ``"mixed"`` (an image and a video).
``case.inputs(names, side)`` builds the keyword inputs of one prompt (``len(names) == 1``: unpadded, as a user
calls it) or of a padded batch. A new family is one entry here: a subclass of :class:`VLMCase` in ``FAMILIES``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
import transformers as hf

PAD = 0
DEPTH = 4
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": DEPTH,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 200,
    "initializer_range": 0.1,
}


def padded(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, L)``: ``prompts`` padded with PAD on ``side``."""
    width = max(map(len, prompts))
    ids, mask = [], []
    for p in prompts:
        pad = [PAD] * (width - len(p))
        ids.append(pad + p if side == "left" else p + pad)
        mask.append([0] * len(pad) + [1] * len(p) if side == "left" else [1] * len(p) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)


@dataclass
class VLMCase:
    """A family's tiny model and prompts (subclasses fill in the class attributes and the three hooks).

    Attributes:
        name: Test id.
        samples: Prompt token ids by sample name (``"a"``, ``"b"``, ``"text"``, optionally ``"video"``/``"mixed"``).
        visual_ids: Placeholder ids of visual tokens (image and video).
        steps: Greedy decode steps of the shared generate checks.
        options: apply() options the family needs, given to every method whose config has that field.
        batches: Pairs of samples run as a padded batch (the first pair: two image prompts).
        beams: Beam widths of the batched-generate check.
    """

    name: str
    samples: dict[str, list[int]] = field(default_factory=dict)
    visual_ids: tuple[int, ...] = ()
    steps: int = 3
    options: dict[str, Any] = field(default_factory=dict)
    batches: tuple[tuple[str, str], ...] = (("a", "b"),)
    beams: tuple[int, ...] = (1,)
    _built: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    depth: ClassVar[int] = DEPTH
    #: sdpa-vs-eager tolerance (float32 logits, absolute).
    float_atol: ClassVar[float] = 1e-5
    #: bfloat16-vs-float32 tolerance of reduced logits (absolute; ``tests/test_vlm_dtypes.py`` says why 0.15).
    bf16_atol: ClassVar[float] = 0.15

    # ------------------------------------------------------------------ hooks a family implements
    def _build(self, attn: str) -> torch.nn.Module:
        """A new eval-mode model with the given attention implementation (seeded: the same weights each time)."""
        raise NotImplementedError

    def inputs(self, names: list[str], side: str = "left") -> dict:
        """Keyword inputs of the samples ``names``: one unpadded prompt, or a batch padded on ``side``."""
        raise NotImplementedError

    def greedy(self, model: torch.nn.Module, inputs: dict, steps: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Greedy ``generate()`` tokens ``(B, L + steps)``."""
        inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
        return model.generate(**inputs, max_new_tokens=steps or self.steps, do_sample=False, **kwargs)

    # ------------------------------------------------------------------ shared
    def build(self, attn: str = "sdpa") -> torch.nn.Module:
        """A fresh copy of the family's model (built once per attention implementation, then deep-copied)."""
        if attn not in self._built:
            torch.manual_seed(0)
            model = self._build(attn).eval()
            model.set_attn_implementation(attn)
            self._built[attn] = model
        return copy.deepcopy(self._built[attn])

    def options_for(self, config_cls: type, options: dict) -> dict:
        """``options`` plus the family's own options the method's config declares."""
        fields = set(config_cls.field_names())
        return {**{k: v for k, v in self.options.items() if k in fields}, **options}

    def lengths(self, names: list[str]) -> list[int]:
        return [len(self.samples[n]) for n in names]

    def has_visual(self, name: str) -> bool:
        return any(t in self.visual_ids for t in self.samples[name])


# ----------------------------------------------------------------------------- LLaVA
LLAVA_IMAGE, LLAVA_TOKENS, LLAVA_ID = 32, 16, 199


def llava_prompt(before: list[int], after: list[int], images: int = 1) -> list[int]:
    """Token ids: ``before`` text, ``images`` image placeholder runs separated by token 3, ``after`` text."""
    ids = list(before)
    for i in range(images):
        ids += ([3] if i else []) + [LLAVA_ID] * LLAVA_TOKENS
    return ids + list(after)


def llava_pixels(n: int, seed: int = 1) -> torch.Tensor:
    """``(n, 3, 32, 32)`` random images."""
    return torch.randn(n, 3, LLAVA_IMAGE, LLAVA_IMAGE, generator=torch.Generator().manual_seed(seed))


def build_llava(text: str = "llama", attn: str = "sdpa") -> hf.LlavaForConditionalGeneration:
    """A tiny LLaVA (CLIP 32px / patch 8: 16 visual tokens per image) on a Llama or Qwen2 text model."""
    torch.manual_seed(0)
    vision = hf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=LLAVA_IMAGE,
        patch_size=8,
    )
    text_cls = {"llama": hf.LlamaConfig, "qwen2": hf.Qwen2Config}[text]
    config = hf.LlavaConfig(
        vision_config=vision,
        text_config=text_cls(**TEXT, max_position_embeddings=256),
        image_token_id=LLAVA_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=PAD,
    )
    model = hf.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


@dataclass
class LlavaCase(VLMCase):
    """LLaVA; one image per image prompt (the batch's images in sample order)."""

    text: str = "llama"

    def _build(self, attn: str) -> torch.nn.Module:
        return build_llava(self.text, attn)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        images = llava_pixels(2)  # sample "a" has the first, "b" the second
        pictures = [images["ab".index(n)][None] for n in names if self.has_visual(n)]
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
        else:
            ids, mask = padded(prompts, side)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() numbers them
            out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if pictures:
            out["pixel_values"] = torch.cat(pictures)
        return out


def llava_samples() -> dict[str, list[int]]:
    return {
        "a": llava_prompt([1, 5, 6], [7, 8, 9, 10]),
        "b": llava_prompt([1, 11], [12, 13, 14, 15, 16, 17]),
        "text": [1, 5, 6, 7, 8, 9, 10],
    }


# ----------------------------------------------------------------------------- LLaVA-OneVision
OV_IMAGE, OV_VIDEO, OV_CROP = 199, 198, 32
OV_WIDE, OV_SQUARE, OV_SMALL = (40, 70), (64, 64), (30, 30)
#: Placeholders per image size: base 16 + high-res rows (+ one newline each); see test_hf_llava_onevision.
OV_PLACEHOLDERS = {OV_WIDE: 52, OV_SQUARE: 88, OV_SMALL: 36}


def ov_images(sizes: list[tuple[int, int]], seed: int = 1) -> dict:
    """``pixel_values`` ``(I, 5, 3, 32, 32)`` (crops padded to 5) and ``image_sizes`` ``(I, 2)``."""
    pixels = torch.randn(len(sizes), 5, 3, OV_CROP, OV_CROP, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def build_onevision(attn: str = "sdpa") -> hf.LlavaOnevisionForConditionalGeneration:
    """A tiny LLaVA-OneVision (SigLIP 32px / patch 8: 16 tokens per crop; anyres pinpoints 32x64, 64x32, 64x64)."""
    torch.manual_seed(0)
    vision = hf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=OV_CROP,
        patch_size=8,
        vision_use_head=False,
    )
    config = hf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=hf.Qwen2Config(**TEXT, max_position_embeddings=512),
        image_token_index=OV_IMAGE,
        video_token_index=OV_VIDEO,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_layer=-1,
        pad_token_id=PAD,
    )
    model = hf.LlavaOnevisionForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


@dataclass
class OneVisionCase(VLMCase):
    """LLaVA-OneVision: ``"a"`` a wide image (52 placeholders, 4 newlines), ``"b"`` a square one (88, 8)."""

    sizes: tuple[tuple[int, int], ...] = (OV_WIDE, OV_SQUARE)

    def _build(self, attn: str) -> torch.nn.Module:
        return build_onevision(attn)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        images = ov_images(list(self.sizes))
        chosen = [("a", "b").index(n) for n in names if self.has_visual(n)]
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
        else:
            ids, mask = padded(prompts, side)
            out = {"input_ids": ids, "attention_mask": mask}
        if chosen:
            out |= {key: value[chosen] for key, value in images.items()}
        return out


def ov_samples() -> dict[str, list[int]]:
    return {
        "a": [1, 5, 6] + [OV_IMAGE] * OV_PLACEHOLDERS[OV_WIDE] + [7, 8, 9],
        "b": [1, 11] + [OV_IMAGE] * OV_PLACEHOLDERS[OV_SQUARE] + [12, 13, 14, 15, 16, 17],
        "text": [1, 5, 6, 7, 8, 9],
    }


# ----------------------------------------------------------------------------- LLaVA-NeXT / LLaVA-NeXT-Video
NEXT_IMAGE, NEXT_VIDEO, NEXT_CROP, NEXT_FRAMES = 199, 198, 32, 3
NEXT_WIDE, NEXT_TALL = (20, 64), (64, 40)
#: Placeholders per image size: base 16 + high-res rows (+ one newline each), unpadded by rows (WIDE: 2 of the
#: 4 rows of 8) or by columns (TALL: 8 rows of 6 of 8); see test_hf_llava_next.
NEXT_PLACEHOLDERS = {NEXT_WIDE: 34, NEXT_TALL: 72}
NEXT_FRAME_TOKENS = 4  # a frame's 4 x 4 patches, average-pooled by 2
NEXT_BATCHES = (("a", "b"), ("video", "a"), ("video", "mixed"))  # LLaVA-NeXT-Video's padded batches
#: Per sample: text before, [(kind, image size or frames, pixel seed), ...], text after.
NEXT_MEDIA = {
    "a": ([1, 5, 6], [("image", NEXT_WIDE, 1)], [7, 8, 9]),
    "b": ([1, 11], [("image", NEXT_TALL, 2)], [12, 13, 14, 15, 16, 17]),
    "text": ([1, 5, 6, 7, 8, 9], [], []),
    "video": ([1, 5], [("video", NEXT_FRAMES, 3)], [7, 8, 9, 10]),
    "mixed": ([1, 6], [("image", NEXT_WIDE, 4), ("video", NEXT_FRAMES, 5)], [7, 8, 9]),
}


def build_llava_next(video: bool = False, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny LLaVA-NeXT (``video``: LLaVA-NeXT-Video): CLIP 32px / patch 8 (16 tokens per crop, class token
    dropped), pinpoints 32x64, 64x32, 64x64, features from the tower's second-to-last layer; Llama text model."""
    torch.manual_seed(0)
    vision = hf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    common = {
        "vision_config": vision,
        "text_config": hf.LlamaConfig(**TEXT, max_position_embeddings=512),
        "image_token_index": NEXT_IMAGE,
        "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "pad_token_id": PAD,
    }
    if video:
        config = hf.LlavaNextVideoConfig(**common, video_token_index=NEXT_VIDEO, spatial_pool_stride=2)
        model = hf.LlavaNextVideoForConditionalGeneration(config)
    else:
        model = hf.LlavaNextForConditionalGeneration(hf.LlavaNextConfig(**common))
    model.eval().set_attn_implementation(attn)
    return model


@dataclass
class LlavaNextCase(VLMCase):
    """LLaVA-NeXT(-Video): ``"a"`` a wide image (34 placeholders, 2 newlines), ``"b"`` a tall one (72, 8);
    with ``video``, ``"video"`` 3 frames of 4 tokens and ``"mixed"`` an image then a video."""

    video: bool = False

    def _build(self, attn: str) -> torch.nn.Module:
        return build_llava_next(self.video, attn)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
        else:
            ids, mask = padded(prompts, side)
            out = {"input_ids": ids, "attention_mask": mask}
        media = [m for n in names for m in NEXT_MEDIA[n][1]]
        images = [(size, seed) for kind, size, seed in media if kind == "image"]
        videos = [(frames, seed) for kind, frames, seed in media if kind == "video"]
        if images:  # (I, 5, 3, 32, 32): crops padded to 5, as the processor pads them
            out["pixel_values"] = torch.cat([next_pixels(5, seed) for _, seed in images])
            out["image_sizes"] = torch.tensor([size for size, _ in images])
        if videos:  # (V, frames, 3, 32, 32)
            out["pixel_values_videos"] = torch.cat([next_pixels(frames, seed) for frames, seed in videos])
        return out


def next_pixels(n: int, seed: int) -> torch.Tensor:
    """``(1, n, 3, 32, 32)`` random crops (or frames)."""
    return torch.randn(1, n, 3, NEXT_CROP, NEXT_CROP, generator=torch.Generator().manual_seed(seed))


def next_samples(video: bool = False) -> dict[str, list[int]]:
    samples = {}
    for name, (before, media, after) in NEXT_MEDIA.items():
        if not video and name in ("video", "mixed"):
            continue
        ids = list(before)
        for i, (kind, size, _) in enumerate(media):
            if kind == "image":
                tokens = [NEXT_IMAGE] * NEXT_PLACEHOLDERS[size]
            else:  # ``size`` frames
                tokens = [NEXT_VIDEO] * (size * NEXT_FRAME_TOKENS)
            ids += ([3] if i else []) + tokens
        samples[name] = ids + list(after)
    return samples


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 199, 198, 197, 196
QWEN_PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
QWEN_SECONDS = 2.0  # Qwen2.5-VL: seconds per temporal grid step (x tokens_per_second 4: 8 positions apart)


def qwen_prompt(
    before: list[int], after: list[int], grids: list[tuple[int, int, int]], tokens: list[int] | None = None
) -> list[int]:
    """Text, then one image per grid (``tokens``: the placeholder id of each, default the image id), then text."""
    ids = list(before)
    for (t, h, w), token in zip(grids, tokens or [QWEN_IMAGE] * len(grids), strict=True):
        ids += [QWEN_START] + [token] * (t * h * w // 4) + [QWEN_END]
    return ids + list(after)


def build_qwen2_vl(attn: str = "sdpa", family: str = "qwen2") -> torch.nn.Module:
    """A tiny Qwen2-VL (vision depth 1, patch 14, spatial merge 2: an 8x8-patch image gives 16 tokens).

    ``family="qwen2.5"``: Qwen2.5-VL (windowed vision attention); ``"qwen2.5-windows"``: a windowed block after
    the full one (8x8 patches -> 3x3 windows). Text: M-RoPE sections [2, 3, 3] of head_dim 16.
    """
    torch.manual_seed(0)
    vision = {"depth": 1, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2":
        config_cls, model_cls = hf.Qwen2VLConfig, hf.Qwen2VLForConditionalGeneration
        vision |= {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    else:
        config_cls, model_cls = hf.Qwen2_5_VLConfig, hf.Qwen2_5_VLForConditionalGeneration
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "window_size": 56}
        vision |= {"fullatt_block_indexes": [0]}
        if family == "qwen2.5-windows":
            vision |= {"depth": 2, "fullatt_block_indexes": [0], "window_size": 84}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = config_cls(
        vision_config=vision,
        text_config={**TEXT, "max_position_embeddings": 256, "rope_parameters": rope},
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    return model


#: Per sample: text before, [(kind, grid (t, h, w) in patches, pixel seed), ...], text after.
QWEN_MEDIA = {
    "a": ([1, 5], [("image", (1, 8, 8), 1)], [7, 8, 9, 10]),  # 16 visual tokens
    "b": ([1, 11, 4], [("image", (1, 4, 8), 2)], [12, 13, 14, 15, 16, 17]),  # 8, not square: h and w differ
    "text": ([1, 5, 7, 8, 9, 10], [], []),
    "video": ([1, 5], [("video", (3, 4, 8), 0)], [7, 8, 9, 10]),  # 3 frames of 8 tokens
    "mixed": ([1, 6], [("image", (1, 8, 8), 20), ("video", (3, 4, 8), 21)], [7, 8, 9]),
}


@dataclass
class QwenCase(VLMCase):
    """Qwen2-VL / Qwen2.5-VL, images and videos; every image or video has its own seeded patches."""

    family: str = "qwen2"

    def _build(self, attn: str) -> torch.nn.Module:
        return build_qwen2_vl(attn, self.family)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        ids, mask = padded([self.samples[n] for n in names], side)
        media: dict[str, list] = {"image": [], "video": []}
        for name in names:
            for kind, (t, h, w), seed in QWEN_MEDIA[name][1]:
                patches = torch.randn(t * h * w, QWEN_PATCH_DIM, generator=torch.Generator().manual_seed(seed))
                media[kind].append(((t, h, w), patches))
        return qwen_inputs(ids, mask, media, self.family)


def qwen_inputs(ids: torch.Tensor, mask: torch.Tensor, media: dict[str, list], family: str) -> dict:
    """Qwen2-VL keyword inputs: ``media`` holds ``((t, h, w), patches)`` per image and per video, in order."""
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int(),  # text 0, image 1, video 2
    }
    for kind, pixels, grids in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if media[kind]:
            out[pixels] = torch.cat([p for _, p in media[kind]])
            out[grids] = torch.tensor([g for g, _ in media[kind]])
    if family != "qwen2" and media["video"]:
        out["second_per_grid_ts"] = torch.full((len(media["video"]),), QWEN_SECONDS)
    return out


def qwen_samples() -> dict[str, list[int]]:
    samples = {}
    for name, (before, media, after) in QWEN_MEDIA.items():
        tokens = [QWEN_IMAGE if kind == "image" else QWEN_VIDEO for kind, _, _ in media]
        samples[name] = qwen_prompt(before, after, [grid for _, grid, _ in media], tokens)
    return samples


# ----------------------------------------------------------------------------- Qwen3-VL / Qwen3-VL-MoE (DeepStack)
QWEN3_STAMP = 30  # a timestamp's text token before each video slice (``<0.5 seconds>``), + slice index


def qwen3_prompt(before: list[int], after: list[int], media: list[tuple[str, tuple[int, int, int]]]) -> list[int]:
    """Text, then each image (one placeholder run) or video (per temporal slice: timestamp, its run), then text."""
    ids = list(before)
    for kind, (t, h, w) in media:
        run = [QWEN_START] + [QWEN_IMAGE if kind == "image" else QWEN_VIDEO] * (h * w // 4) + [QWEN_END]
        ids += run if kind == "image" else [tok for i in range(t) for tok in [QWEN3_STAMP + i, *run]]
    return ids + list(after)


def build_qwen3_vl(attn: str = "sdpa", moe: bool = False) -> torch.nn.Module:
    """A tiny Qwen3-VL (vision depth 2, patch 14, merge 2, DeepStack from both tower layers: 2 levels, added
    after LLM layers 0 and 1; 4x4 learned position grid interpolated). ``moe``: Qwen3-VL-MoE, a sparse block
    (4 experts, top 2) in layers 1 and 3, experts run as plain matmuls (``eager``) so torch's counter sees them."""
    torch.manual_seed(0)
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_position_embeddings": 16}
    vision |= {"deepstack_visual_indexes": [0, 1]}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = {**TEXT, "head_dim": 16, "max_position_embeddings": 256, "rope_parameters": rope}
    config_cls, model_cls = hf.Qwen3VLConfig, hf.Qwen3VLForConditionalGeneration
    if moe:
        config_cls, model_cls = hf.Qwen3VLMoeConfig, hf.Qwen3VLMoeForConditionalGeneration
        text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2}
    ids = {"image_token_id": QWEN_IMAGE, "video_token_id": QWEN_VIDEO}
    ids |= {"vision_start_token_id": QWEN_START, "vision_end_token_id": QWEN_END}
    config = config_cls(vision_config=vision, text_config=text, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **ids)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    if moe:
        model.set_experts_implementation("eager")
    return model


@dataclass
class Qwen3Case(QwenCase):
    """Qwen3-VL / Qwen3-VL-MoE on Qwen2-VL's media (``QWEN_MEDIA``; inputs as Qwen2-VL's), videos slice by slice."""

    moe: bool = False

    def _build(self, attn: str) -> torch.nn.Module:
        return build_qwen3_vl(attn, self.moe)


#: Qwen3.5's layer types in the matrix: every layer a removal may follow is full attention (removal after a
#: linear-attention layer is refused: it has no softmax queries/keys to score), the last one is linear, so a
#: linear-attention layer runs on the compact sequence. ``tests/test_hf_qwen3_5.py`` also puts one first.
QWEN3_5_TYPES = ("full_attention", "full_attention", "full_attention", "linear_attention")


def build_qwen3_5(attn: str = "sdpa", types: tuple[str, ...] = QWEN3_5_TYPES) -> torch.nn.Module:
    """A tiny Qwen3.5: Qwen3-VL's tower (depth 2, merge 2) and a 4-layer hybrid text model (gated delta-net
    linear attention, conv kernel 4, and full attention, as ``types`` says)."""
    torch.manual_seed(0)
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_position_embeddings": 16}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    rope["partial_rotary_factor"] = 1.0
    text = {**TEXT, "head_dim": 16, "max_position_embeddings": 256, "rope_parameters": rope, "layer_types": list(types)}
    text |= {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8}
    text |= {"linear_value_head_dim": 8}
    ids = {"image_token_id": QWEN_IMAGE, "video_token_id": QWEN_VIDEO}
    ids |= {"vision_start_token_id": QWEN_START, "vision_end_token_id": QWEN_END}
    config = hf.Qwen3_5Config(
        vision_config=vision, text_config=text, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **ids
    )
    model = hf.Qwen3_5ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


@dataclass
class Qwen3_5Case(QwenCase):
    """Qwen3.5 (hybrid linear / full attention) on Qwen3-VL's prompts and Qwen2-VL's media.

    Its gated delta-rule recurrence carries rounding further than attention does: unreduced, sdpa and eager
    logits differ by 6e-6 (other families: <= 3e-6) and bfloat16 and float32 ones by 0.14 (others: 0.03-0.07),
    so both tolerances are twice the others' (measured once, 2026-12-02, on this case's prompt "a").
    """

    float_atol: ClassVar[float] = 2e-5
    bf16_atol: ClassVar[float] = 0.3

    def _build(self, attn: str) -> torch.nn.Module:
        return build_qwen3_5(attn)

    def greedy(self, model, inputs, steps=None, **kwargs):
        # min_new_tokens: this tiny model emits EOS early on some prompts; every check compares full lengths.
        steps = steps or self.steps
        return super().greedy(model, inputs, steps, pad_token_id=PAD, min_new_tokens=steps, **kwargs)


def qwen3_samples() -> dict[str, list[int]]:
    return {n: qwen3_prompt(b, a, [(k, g) for k, g, _ in media]) for n, (b, media, a) in QWEN_MEDIA.items()}


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM
IDEFICS_IMAGE, IDEFICS_SIDE, IDEFICS_TOKENS = 199, 32, 16
FAKE, GLOBAL, ROW1_COL1, ROW1_COL2, NEWLINE = 190, 191, 180, 181, 10
_SUB = [IDEFICS_IMAGE] * IDEFICS_TOKENS
#: A 1 x 2 split image + its global view (3 sub-images, 48 visual tokens), as the processor writes it.
IDEFICS_SPLIT = [1, 5, FAKE, ROW1_COL1, *_SUB, FAKE, ROW1_COL2, *_SUB, NEWLINE, NEWLINE, FAKE, GLOBAL, *_SUB, FAKE]
IDEFICS_SPLIT += [7, 8, 9]
#: An image that is not split: the global view only.
IDEFICS_WHOLE = [1, 11, FAKE, GLOBAL, *_SUB, FAKE, 12, 13, 14, 15, 16, 17]
IDEFICS_SUB_IMAGES = {"a": 3, "b": 1}


def idefics_pixels(seed: int = 1) -> torch.Tensor:
    """``(2, 3, 3, 32, 32)``: the split image's three sub-images, the whole one's one (then zeros, as HF pads)."""
    values = torch.randn(2, 3, 3, IDEFICS_SIDE, IDEFICS_SIDE, generator=torch.Generator().manual_seed(seed))
    values[1, 1:] = 0
    return values


def build_idefics3(family: str = "idefics3", attn: str = "sdpa") -> torch.nn.Module:
    """A tiny Idefics3 or SmolVLM (32px / patch 4 -> 64 patches, pixel shuffle x2 -> 16 tokens per sub-image)."""
    torch.manual_seed(0)
    vision_cls, config_cls, model_cls = {
        "idefics3": (hf.Idefics3VisionConfig, hf.Idefics3Config, hf.Idefics3ForConditionalGeneration),
        "smolvlm": (hf.SmolVLMVisionConfig, hf.SmolVLMConfig, hf.SmolVLMForConditionalGeneration),
    }[family]
    vision = vision_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IDEFICS_SIDE,
        patch_size=4,
    )
    text = hf.LlamaConfig(**TEXT, max_position_embeddings=512, pad_token_id=PAD)
    config = config_cls(vision_config=vision, text_config=text, image_token_id=IDEFICS_IMAGE, scale_factor=2)
    model = model_cls(config).eval()
    model.set_attn_implementation(attn)
    return model


@dataclass
class IdeficsCase(VLMCase):
    """Idefics3 / SmolVLM: ``"a"`` a split image (3 sub-images), ``"b"`` a whole one (1)."""

    family: str = "idefics3"

    def _build(self, attn: str) -> torch.nn.Module:
        return build_idefics3(self.family, attn)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        pixels = idefics_pixels()
        rows = [("a", "b").index(n) for n in names if self.has_visual(n)]
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
            if rows:
                out["pixel_values"] = pixels[rows, : IDEFICS_SUB_IMAGES[names[0]]]
            return out
        ids, mask = padded(prompts, side)
        out = {"input_ids": ids, "attention_mask": mask}
        if rows:  # one row per sample with an image, all-zero sub-images as padding
            out["pixel_values"] = pixels[rows, : max(IDEFICS_SUB_IMAGES[n] for n in names if self.has_visual(n))]
        return out

    def greedy(self, model, inputs, steps=None, **kwargs):
        return super().greedy(model, inputs, steps, pad_token_id=PAD, **kwargs)


def idefics_samples() -> dict[str, list[int]]:
    return {"a": IDEFICS_SPLIT, "b": IDEFICS_WHOLE, "text": [1, 5, 6, 7, 8, 9, 12]}


# ----------------------------------------------------------------------------- InternVL
INTERN_IMAGE, INTERN_START, INTERN_END, INTERN_SIDE, INTERN_TOKENS = 199, 190, 191, 32, 16
FRAME, COLON = 20, 22  # "Frame", ":" (frame numbers are tokens 21, 23)
#: Tiles per sample: "a" a 1 x 2 grid + its thumbnail, "b" one tile (no thumbnail), "frames" 2 video frames.
INTERN_TILES = {"a": 3, "b": 1, "frames": 2}


def intern_prompt(before: list[int], tiles: list[int], after: list[int], labels: list[list[int]] | None = None):
    """Text, then one ``<img>`` + 16 placeholders per tile + ``</img>`` per image (after its ``labels``), text."""
    ids = list(before)
    for i, count in enumerate(tiles):
        ids += (labels[i] if labels else []) + [INTERN_START] + [INTERN_IMAGE] * (INTERN_TOKENS * count)
        ids += [INTERN_END]
    return ids + list(after)


def intern_pixels(name: str) -> torch.Tensor:
    """``(tiles, 3, 32, 32)``: the tiles of sample ``name`` (seeded per sample)."""
    seed = 1 + list(INTERN_TILES).index(name)
    return torch.randn(INTERN_TILES[name], 3, INTERN_SIDE, INTERN_SIDE, generator=torch.Generator().manual_seed(seed))


def build_internvl(attn: str = "sdpa", qk_norm: bool = False) -> torch.nn.Module:
    """A tiny InternVL (InternViT 32px / patch 4 -> 64 patches + class token, pixel shuffle 0.5 -> 16 per tile).

    ``qk_norm``: InternViT-6B's layout (RMSNorm on queries and keys, RMSNorm layers); default InternViT-300M's.
    HF zero-initialises the class token and position embeddings: they are drawn here, so the class token's
    attention is not uniform.
    """
    torch.manual_seed(0)
    vision = hf.InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=INTERN_SIDE,
        patch_size=4,
        use_qk_norm=qk_norm,
        norm_type="rms_norm" if qk_norm else "layer_norm",
        initializer_range=0.1,
    )
    text = hf.Qwen2Config(**TEXT, max_position_embeddings=512, pad_token_id=PAD)
    config = hf.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=INTERN_IMAGE, image_seq_length=INTERN_TOKENS
    )
    model = hf.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.vision_tower.embeddings.cls_token.normal_()
        model.model.vision_tower.embeddings.position_embeddings.normal_(std=0.5)
    model.set_attn_implementation(attn)
    return model


@dataclass
class InternVLCase(VLMCase):
    """InternVL: ``"a"`` 3 tiles, ``"b"`` 1, ``"frames"`` two 1-tile frames after ``FrameN:`` text."""

    def _build(self, attn: str) -> torch.nn.Module:
        return build_internvl(attn)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
        else:
            ids, mask = padded(prompts, side)
            out = {"input_ids": ids, "attention_mask": mask}
        tiles = [intern_pixels(n) for n in names if self.has_visual(n)]
        if tiles:  # every tile of the batch, in sample order
            out["pixel_values"] = torch.cat(tiles)
        return out

    def greedy(self, model, inputs, steps=None, **kwargs):
        return super().greedy(model, inputs, steps, pad_token_id=PAD, **kwargs)


def intern_samples() -> dict[str, list[int]]:
    frames = [[FRAME, 21, COLON], [FRAME, 23, COLON]]
    return {
        "a": intern_prompt([1, 5], [3], [7, 8, 9]),
        "b": intern_prompt([1, 11], [1], [12, 13, 14, 15, 16, 17]),
        "text": [1, 5, 6, 7, 8, 9, 12],
        "frames": intern_prompt([1, 6], [1, 1], [7, 8], frames),
    }


# ----------------------------------------------------------------------------- Mistral3 (Pixtral tower)
MISTRAL_IMAGE, MISTRAL_BREAK, MISTRAL_END, MISTRAL_PATCH = 199, 198, 197, 4
#: Per sample: text before, [(image (height, width) in pixels, pixel seed), ...] with text 6 between, text after.
#: 8 px per LLM token (patch 4, 2 x 2 merge): (32, 48) -> 4 rows of 6, (16, 24) -> 2 of 3, (24, 32) -> 3 of 4.
MISTRAL_MEDIA = {
    "a": ([1, 5], [((32, 48), 1), ((16, 24), 2)], [7, 8, 9]),  # two images of different sizes
    "b": ([1, 11], [((24, 32), 3)], [12, 13, 14, 15, 16, 17]),
    "text": ([1, 5, 6, 7, 8, 9], [], []),
}


def mistral_image(height: int, width: int) -> list[int]:
    """One image as PixtralProcessor writes it: rows of [IMG], each ended by [IMG_BREAK], the last by [IMG_END]."""
    unit = 2 * MISTRAL_PATCH
    rows = [[MISTRAL_IMAGE] * (width // unit) + [MISTRAL_BREAK] for _ in range(height // unit)]
    ids = [t for row in rows for t in row]
    return ids[:-1] + [MISTRAL_END]


def pixtral_configs(patch: int) -> tuple[hf.PixtralVisionConfig, hf.MistralConfig]:
    """The Pixtral tower (2 layers, 2-D RoPE, ``patch`` px) and Mistral text model of the Pixtral-tower cases."""
    vision = hf.PixtralVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        image_size=48,
        patch_size=patch,
        initializer_range=0.1,
    )
    text = hf.MistralConfig(**TEXT, max_position_embeddings=512, sliding_window=None, pad_token_id=PAD)
    return vision, text


def build_mistral3(attn: str = "sdpa") -> torch.nn.Module:
    """A tiny Mistral3 (Pixtral: 2 layers, patch 4, 2-D RoPE; 2 x 2 patch merger; Mistral text model)."""
    torch.manual_seed(0)
    vision, text = pixtral_configs(MISTRAL_PATCH)
    config = hf.Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=MISTRAL_IMAGE, spatial_merge_size=2
    )
    model = hf.Mistral3ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def build_pixtral_llava(attn: str = "sdpa") -> torch.nn.Module:
    """A tiny Pixtral-12B layout: ``LlavaForConditionalGeneration`` with Mistral3's Pixtral tower but patch 8 and
    no merger (so its images have Mistral3's case's token grids), LLaVA's MLP projector, ``"full"`` features."""
    torch.manual_seed(0)
    vision, text = pixtral_configs(2 * MISTRAL_PATCH)
    config = hf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=MISTRAL_IMAGE,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = hf.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def mistral_pixels(names: list[str]) -> dict:
    """``pixel_values`` ``(I, 3, H, W)`` (each image seeded, zero-padded to the largest) and ``image_sizes``."""
    images = [(size, seed) for name in names for size, seed in MISTRAL_MEDIA[name][1]]
    if not images:
        return {}
    height, width = (max(size[i] for size, _ in images) for i in (0, 1))
    pixels = torch.zeros(len(images), 3, height, width)
    for i, ((h, w), seed) in enumerate(images):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": pixels, "image_sizes": torch.tensor([size for size, _ in images])}


@dataclass
class Mistral3Case(VLMCase):
    """Mistral3: ``"a"`` two images of different sizes (24 + 6 [IMG], 4 + 2 row ends), ``"b"`` one (12, 3)."""

    def _build(self, attn: str) -> torch.nn.Module:
        return build_mistral3(attn)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
        else:
            ids, mask = padded(prompts, side)
            out = {"input_ids": ids, "attention_mask": mask}
        return out | mistral_pixels(names)

    def greedy(self, model, inputs, steps=None, **kwargs):
        return super().greedy(model, inputs, steps, pad_token_id=PAD, **kwargs)


@dataclass
class PixtralLlavaCase(Mistral3Case):
    """Pixtral-12B's layout (LLaVA class, Pixtral tower, no merger) on Mistral3's prompts and images."""

    def _build(self, attn: str) -> torch.nn.Module:
        return build_pixtral_llava(attn)


def mistral_samples() -> dict[str, list[int]]:
    samples = {}
    for name, (before, images, after) in MISTRAL_MEDIA.items():
        ids = list(before)
        for i, ((h, w), _) in enumerate(images):
            ids += ([6] if i else []) + mistral_image(h, w)
        samples[name] = ids + list(after)
    return samples


# ----------------------------------------------------------------------------- Gemma 3 (sliding + global layers)
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI, GEMMA_TOKENS = 199, 197, 198, 16
GEMMA_LAYERS = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
#: Per sample: text before, images (pixel seeds; 6 between two), text after. "a": an image and a pan-and-scan crop.
GEMMA_MEDIA = {
    "a": ([2, 5, 6], [1, 2], [7, 8, 9]),
    "b": ([2, 11], [3], [12, 13, 14, 15, 16, 17]),
    "text": ([2, 5, 6, 7, 8, 9], [], []),
}


def gemma_prompt(before: list[int], images: int, after: list[int]) -> list[int]:
    """Text, ``images`` runs of 16 ``[IMG]`` each wrapped in begin/end-of-image (text) tokens, then text."""
    ids = list(before)
    for i in range(images):
        ids += ([6] if i else []) + [GEMMA_BOI] + [GEMMA_IMAGE] * GEMMA_TOKENS + [GEMMA_EOI]
    return ids + list(after)


def build_gemma3(attn: str = "sdpa", sliding_window: int = 64, layer_types: tuple[str, ...] = GEMMA_LAYERS):
    """A tiny Gemma 3 (SigLIP 32 px / patch 4: an 8 x 8 grid average-pooled by 2 to 16 tokens; text: hidden 64,
    4 layers of ``layer_types``, head_dim 16, q/k-norm, scaled embeddings, local and global RoPE bases)."""
    torch.manual_seed(0)
    vision = hf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
        vision_use_head=False,
    )
    text = hf.Gemma3TextConfig(
        **TEXT,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=256,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        pad_token_id=PAD,
    )
    config = hf.Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=GEMMA_TOKENS,
        boi_token_index=GEMMA_BOI,
        eoi_token_index=GEMMA_EOI,
        image_token_index=GEMMA_IMAGE,
    )
    model = hf.Gemma3ForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


@dataclass
class Gemma3Case(VLMCase):
    """Gemma 3: ``token_type_ids`` (1 on ``[IMG]``) as Gemma3Processor returns them, each image 16 tokens."""

    sliding_window: int = 64

    def _build(self, attn: str) -> torch.nn.Module:
        return build_gemma3(attn, self.sliding_window)

    def inputs(self, names: list[str], side: str = "left") -> dict:
        prompts = [self.samples[n] for n in names]
        if len(names) == 1:
            out = {"input_ids": torch.tensor(prompts)}
        else:
            ids, mask = padded(prompts, side)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() numbers them
            out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        out["token_type_ids"] = (out["input_ids"] == GEMMA_IMAGE).long()
        seeds = [seed for n in names for seed in GEMMA_MEDIA[n][1]]
        if seeds:
            out["pixel_values"] = torch.stack(
                [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
            )
        return out

    def greedy(self, model, inputs, steps=None, **kwargs):
        return super().greedy(model, inputs, steps, pad_token_id=PAD, **kwargs)


def gemma_samples() -> dict[str, list[int]]:
    return {name: gemma_prompt(before, len(images), after) for name, (before, images, after) in GEMMA_MEDIA.items()}


# ----------------------------------------------------------------------------- the families
QWEN_OPTIONS = {"merge_positions": "original"}  # M-RoPE: a merged token keeps a 3-axis position of its image
QWEN_BATCHES = (("a", "b"), ("video", "a"), ("video", "mixed"))


@functools.cache
def families() -> dict[str, VLMCase]:
    """Every VLM family's case, by id (built lazily: models are made on first use, once per module run)."""
    cases = [
        LlavaCase("llava-llama", llava_samples(), (LLAVA_ID,), steps=5, beams=(1, 3), text="llama"),
        LlavaCase("llava-qwen2", llava_samples(), (LLAVA_ID,), steps=5, text="qwen2"),
        OneVisionCase("llava-onevision", ov_samples(), (OV_IMAGE, OV_VIDEO)),
        LlavaNextCase("llava-next", next_samples(), (NEXT_IMAGE,)),
        LlavaNextCase(
            "llava-next-video", next_samples(True), (NEXT_IMAGE, NEXT_VIDEO), batches=NEXT_BATCHES, video=True
        ),
        QwenCase("qwen2-vl", qwen_samples(), (QWEN_IMAGE, QWEN_VIDEO), 5, QWEN_OPTIONS, QWEN_BATCHES),
        QwenCase(
            "qwen2.5-vl", qwen_samples(), (QWEN_IMAGE, QWEN_VIDEO), 4, QWEN_OPTIONS, QWEN_BATCHES, family="qwen2.5"
        ),
        Qwen3Case("qwen3-vl", qwen3_samples(), (QWEN_IMAGE, QWEN_VIDEO), 4, QWEN_OPTIONS, QWEN_BATCHES),
        Qwen3Case("qwen3-vl-moe", qwen3_samples(), (QWEN_IMAGE, QWEN_VIDEO), 4, QWEN_OPTIONS, QWEN_BATCHES, moe=True),
        Qwen3_5Case("qwen3.5", qwen3_samples(), (QWEN_IMAGE, QWEN_VIDEO), 4, QWEN_OPTIONS, QWEN_BATCHES),
        IdeficsCase("idefics3", idefics_samples(), (IDEFICS_IMAGE,), family="idefics3"),
        IdeficsCase("smolvlm", idefics_samples(), (IDEFICS_IMAGE,), family="smolvlm"),
        InternVLCase(
            "internvl", intern_samples(), (INTERN_IMAGE,), beams=(1, 2), batches=(("a", "b"), ("frames", "a"))
        ),
        Mistral3Case("mistral3", mistral_samples(), (MISTRAL_IMAGE, MISTRAL_BREAK, MISTRAL_END), beams=(1, 2)),
        PixtralLlavaCase("llava-pixtral", mistral_samples(), (MISTRAL_IMAGE, MISTRAL_BREAK, MISTRAL_END)),
        Gemma3Case("gemma3", gemma_samples(), (GEMMA_IMAGE,), steps=4, beams=(1, 2)),
    ]
    return {case.name: case for case in cases}


FAMILIES = list(families())


@functools.cache
def family_adapter(name: str) -> type:
    """The adapter class tokenprune picks for the family case ``name``."""
    from tokenprune import registry

    return registry.find_adapter(families()[name].build())


def skip_without_tower_merging(name: str, method: str) -> None:
    """Skip a ViT method (e.g. ``tome``, run inside the vision tower) on a family that declares it cannot."""
    from tokenprune import registry
    from tokenprune.methods.vlm import VisualTokenMethod

    if not issubclass(registry.get_method(method).method_cls, VisualTokenMethod):
        adapter = family_adapter(name)
        if not adapter.tower_merging:
            pytest.skip(f"{adapter.__name__}: no ViT method inside its vision tower ({adapter.no_tower_merging})")

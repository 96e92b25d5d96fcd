"""``LlavaNextForConditionalGeneration`` (transformers 5.x, anyres tiling).

Every VLM method (``tokenprune.methods(kind="vlm")``) patches the model in place; ``forward`` and ``generate()``
keep their signatures. The language-model side is :mod:`tokenprune.adapters.vlm`, shared by every family.

LLaVA-NeXT is the anyres layout LLaVA-OneVision took over: one image is a base crop (the whole image at
``image_size``) and the tiles of a higher-resolution grid chosen from ``image_grid_pinpoints``; HF's
``pack_image_features`` lays its placeholders out as::

    [base grid: side x side tokens, row-major]
    [high-res grid (tiles stitched, unpadded to the image's aspect ratio): R rows of W tokens, each + newline]

So everything :mod:`.llava_onevision` does holds here and is inherited: the layout is computed by HF's own
``pack_image_features`` on constant stand-ins (whatever unpadding it applies), ``image_newline`` tokens are
structural (kept like text, never merged, pruned or used as query rows), each image is two spans (base grid,
high-res grid), ``generate()``'s pre-encoded features are read back by the same layout rules, and the vision
tower's signals are packed exactly as HF packs the features. What differs, and is overridden here:

* ``pack_image_features`` takes ``vision_feature_select_strategy`` (no ``vision_aspect_ratio`` resizing);
* every image is tiled, however many a prompt holds (there is no ``batch_num_images``);
* the tower is usually CLIP, whose class token HF drops under ``vision_feature_select_strategy="default"``:
  the tower signals drop it the same way (visionzip / vispruner read the class token's attention to each patch).

``LlavaNextVideoForConditionalGeneration`` adds videos: each frame goes through the tower alone, its patch grid
is pooled by ``spatial_pool_stride`` (``vision_resampler``, average by default) and projected, and the frames'
tokens fill the ``config.video_token_id`` placeholders one frame after another, with no newline tokens. Every
frame is its own span (AIM merges within a frame, never across frames or with an image); in-LLM pruning ranks
image and video tokens of a prompt together. Tower signals of a frame are pooled as its features are (the mean
over each pooling window), and scattered onto the video placeholders apart from the images' (HF runs the tower
on the images first, then on the videos, and scatters each onto its own placeholders).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vlm.flops import tower_has_class_token, vit_tower_flops
from tokenprune.adapters.vlm.llava_onevision import LlavaOnevisionAdapter
from tokenprune.adapters.vlm.state import DecoderState, TowerSequence, VisualInputs
from tokenprune.adapters.vlm.tower import (
    attention_flops,
    expand_rows,
    patch_attention,
    per_sample_flops,
    scatter_tokens,
)
from tokenprune.core.sequence import split_runs
from tokenprune.registry import register_adapter


class LlavaNextAdapter(LlavaOnevisionAdapter):
    """``LlavaNextForConditionalGeneration``: anyres crops, unpadding and newline tokens (as LLaVA-OneVision)."""

    description = "transformers LlavaNextForConditionalGeneration (anyres)"
    layout = "transformers 5.x LLaVA-NeXT"

    def crops_per_image(self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None) -> list[int]:
        """Crops the tower runs on for each image: LLaVA-NeXT tiles every image (``batch_num_images`` ignored)."""
        return super().crops_per_image(image_sizes, None)

    def _pack(self, maps: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        """HF's own ``pack_image_features`` on per-crop maps ``(crops_i, side * side, F)``: ``(tokens_i, F)`` each."""
        strategy = self.model.config.vision_feature_select_strategy
        packed, _ = self.inner.pack_image_features(maps, image_sizes.cpu(), strategy, image_newline=newline)
        return list(packed)


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """``LlavaNextVideoForConditionalGeneration``: LLaVA-NeXT images, and videos of pooled frames (a span each)."""

    description = "transformers LlavaNextVideoForConditionalGeneration (anyres images, pooled video frames)"
    layout = "transformers 5.x LLaVA-NeXT-Video"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not hasattr(self.inner, "vision_resampler"):
            raise TypeError(
                f"{type(model).__name__}.model has no vision_resampler (the video frames' pooling); tokenprune "
                f"knows the {self.layout} layout"
            )
        self._frames: list[int] = []  # per sample of the last prefill: video frames the tower ran on
        self._video: torch.Tensor | None = None  # (B, L) video placeholders of the last call

    # ----------------------------------------------------------------- the video layout
    def frame_tokens(self) -> int:
        """LLM tokens of one video frame: its ``side x side`` patch grid pooled by ``spatial_pool_stride``."""
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size // self.model.config.spatial_pool_stride) ** 2

    def find_visual(self, input_ids: torch.Tensor | None, kwargs: dict) -> VisualInputs | None:
        found = super().find_visual(input_ids, kwargs)  # the images' spans and newline tokens
        video = self.visual_mask(input_ids, kwargs, self.model.config.video_token_id)  # (B, L)
        self._video = video
        if found is None or video is None or not bool(video.any()):
            return found
        images = found.visual if found.structural is None else found.visual | found.structural
        if not bool(images.any()):  # no image: the images' bookkeeping was not renewed for this prefill
            self._crops = [[] for _ in range(video.shape[0])]
        ran = kwargs.get("pixel_values_videos") is not None  # else generate() ran the tower before this forward
        self._frames = [int(n) // self.frame_tokens() if ran else 0 for n in video.sum(dim=1).tolist()]
        frames = split_runs(video, self.frame_tokens())  # (B, L) one id per frame, -1 elsewhere
        offset = found.segments.max().clamp(min=-1) + 1  # frame ids after every image span's
        segments = torch.where(video, frames + offset, found.segments)
        return VisualInputs(found.visual | video, segments, found.structural)

    # ----------------------------------------------------------------- vision-tower signals
    def frame_tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        """A per-patch signal ``(F, P, ...)`` of the tower's frames -> ``(F * frame_tokens, ...)``, pooled as HF
        pools the features (the mean over each ``stride x stride`` window of the row-major patch grid)."""
        if self.model.config.vision_feature_select_strategy == "default":
            signal = signal[:, 1:]  # HF drops the first (class) token before pooling
        stride = self.model.config.spatial_pool_stride
        side = int(round(signal.shape[1] ** 0.5))
        pooled = side // stride
        grid = signal.unflatten(1, (side, side))[:, : pooled * stride, : pooled * stride]  # (F, s', s', ...)
        blocks = grid.unflatten(1, (pooled, stride)).unflatten(3, (pooled, stride))  # (F, n, s, n, s, ...)
        return blocks.mean(dim=(2, 4)).flatten(0, 2)

    def tower_sequence(self, found: VisualInputs, runs: list) -> TowerSequence | None:
        """Image runs onto image placeholders (as LLaVA-NeXT), the last run (the videos' frames) onto video ones."""
        video = self._video
        if self.tower_merge is not None or video is None or not bool(video.any()):
            return super().tower_sequence(found, runs)
        if not runs:
            return None
        images = VisualInputs(found.visual & ~video, found.segments, found.structural)
        has_images = bool((images.visual if images.structural is None else images.visual | images.structural).any())
        image = super().tower_sequence(images, runs[:-1]) if has_images else None
        if has_images and image is None:
            return None
        queries, keys = runs[-1]  # (F, H, P, D): every frame of every video, in order
        frames, heads, patches, dim = queries.shape
        has_class = tower_has_class_token(self.vision_tower)
        ids = torch.arange(frames, dtype=torch.float32)[:, None].expand(frames, patches)
        rows = [
            expand_rows(self.frame_tower_tokens(t), video)
            for t in (patch_attention(queries, keys, has_class), keys.float().mean(dim=1), ids)
        ]
        if any(r is None for r in rows):
            return None
        attention, key_rows, owner = scatter_tokens(rows[0], video), scatter_tokens(rows[1], video), rows[2]
        costs = torch.full((frames,), attention_flops(patches, heads, dim, has_class))
        flops = per_sample_flops(owner.round().long(), video, costs)
        if image is not None:
            attention, key_rows = attention + image.attention, key_rows + image.keys
            flops = [a + b for a, b in zip(flops, image.flops, strict=True)]
        layer = self.reducer.runtime.method.tower_layer % len(self.tower_layer_list())
        return TowerSequence(layer, attention, key_rows, has_class, flops)

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def frame_flops(self) -> float:
        """Vision tower + pooling (a conv's, in ``"conv"`` mode) + projector for one video frame."""
        pool = self.inner.vision_resampler.pool
        pooling = 2.0 * self.frame_tokens() * pool.weight.numel() if isinstance(pool, nn.Conv2d) else 0.0
        tower = vit_tower_flops(self.vision_tower, self.vision_tower.config)
        return tower + pooling + 2.0 * self.frame_tokens() * linear_macs(self.projector)

    def sample_vision_flops(self, state: DecoderState, sample: int) -> float:
        """Every crop of the sample's images and every frame of its videos the tower ran on in the last prefill."""
        frames = self._frames[sample] if sample < len(self._frames) else 0
        return super().sample_vision_flops(state, sample) + frames * self.frame_flops()

    def inputs_vision_flops(self, inputs: dict) -> float:
        """The tower once per image crop (from ``image_sizes``) and once per video frame."""
        videos = inputs.get("pixel_values_videos")  # (V, F, C, H, W)
        frames = int(videos.shape[0] * videos.shape[1]) if videos is not None else 0
        return super().inputs_vision_flops(inputs) + frames * self.frame_flops()


register_adapter(hf_classes("LlavaNextForConditionalGeneration"), LlavaNextAdapter, LlavaNextAdapter.description)
register_adapter(
    hf_classes("LlavaNextVideoForConditionalGeneration"), LlavaNextVideoAdapter, LlavaNextVideoAdapter.description
)

"""``LlavaOnevisionForConditionalGeneration`` (transformers 5.x, anyres tiling).

Every VLM method (``tokenprune.methods(kind="vlm")``) patches the model in place; ``forward`` and ``generate()``
keep their signatures. The language-model side (real removal, masks, compact KV cache, decode) is
:mod:`tokenprune.adapters.vlm`, shared by every family; this file owns the anyres layout of the image placeholders.

LLaVA-OneVision turns one image into crops: a base crop (the whole image at ``image_size``) and, for a single
image per prompt, tiles of a higher-resolution grid chosen from ``image_grid_pinpoints``. HF's
``pack_image_features`` lays one image's placeholders out as::

    [base grid: side x side tokens, row-major]
    [high-res grid (tiles stitched, unpadded, maybe resized): R rows of W tokens, each row followed by newline]

(a base-only image, e.g. with several images per prompt, is ``[base grid][newline]``). Every one of these
placeholders is ``config.image_token_id``, so the layout cannot be read from the ids. A forward pre-hook on
``model.model`` computes it from ``image_sizes`` (and ``batch_num_images``) by running HF's own
``pack_image_features`` on constant stand-in features (base 0, tiles 1, newline 2): whatever unpadding or
resizing HF applies, each placeholder's kind comes out exactly as HF will scatter the real features.

What the reduction does with that layout:

* **Newline tokens are structural**: kept like text, never merged or pruned, and not query rows of AIM's
  text-to-visual importance. Why: ``image_newline`` is one learned vector, the same at every row end; it holds
  no image content to rank, and it is how the LLM knows the grid's row structure. Merging it with patches
  (cosine similarity) would blur that marker into content, and pruning rows' ends would make the remaining
  tokens read as one long row. There is one per high-res row (a few percent of the image's tokens).
* **AIM merges the base grid and the high-res grid of each image separately** (two spans per image, the
  high-res span straddling its newline tokens): the two grids are the same picture at two scales, so
  matching across them would average a coarse and a fine view of one spot into a token of neither grid.
  Merged tokens are stored at a position of their own grid, so spatial order and every row's newline stay.
* FastV / AIM pruning ranks the visual tokens of the whole prompt together (base and high-res alike).

``generate()`` encodes the images itself and passes ``mm_encoder_outputs`` instead of ``pixel_values``: then
the layout is read from the packed features (base grid first; newline tokens are exact copies of
``image_newline``). With neither, each run of placeholders is one span with no structural tokens. Video
placeholders are left alone (treated like text), except for temporal methods (a method class with
``whole_videos = True``, e.g. ``dycoke``): HF lays a video of ``F`` frames out as ``F`` pooled grids of
``ceil(side / 2)**2`` tokens, frame after frame, then one ``image_newline``; each video is one span (the newline
structural) and :attr:`LlavaOnevisionAdapter.span_frames` says how many frames a span of each size holds (image
grids: 1). ``F`` comes from ``pixel_values_videos`` ``(V, F, 3, H, W)``, or in ``generate()`` from the encoded
videos. Their tower runs (one crop per frame) are counted in the vision FLOPs. ``labels`` are refused while
reducing, as for LLaVA.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.state import DecoderState, VisualInputs
from tokenprune.core.sequence import split_runs
from tokenprune.registry import register_adapter

# Kinds of one image's placeholders, as the stand-in values packed by HF's pack_image_features.
BASE, HIGH_RES, NEWLINE = 0, 1, 2


class LlavaOnevisionAdapter(VLMAdapter):
    """``LlavaOnevisionForConditionalGeneration``, images (anyres crops and newline tokens); videos untouched."""

    description = "transformers LlavaOnevisionForConditionalGeneration (anyres)"
    layout = "transformers 5.x LLaVA-OneVision"
    has_static_size = False
    tower_signals = True
    no_tower_merging = (
        "anyres unpadding crops each image's grid to its aspect ratio after the tower, so the tokens an image keeps "
        "would vary per image and could not be planned before the tower runs"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._crops: list[list[int]] = []  # per sample of the last prefill: crops of each of its images
        self._tower_layout: tuple[torch.Tensor, torch.Tensor | None] | None = None  # image_sizes, batch_num_images
        # LLaVA-OneVision's own video layout (pooled frames and a newline); not its subclasses' (LLaVA-NeXT's).
        self._onevision_videos = type(self.inner).__name__.startswith("LlavaOnevision")
        self._video_frames: list[int] = []  # per sample of the last prefill: frames of its videos (tower runs)
        if self._onevision_videos:
            #: With a ``whole_videos`` method: for each span size of the last call with visual inputs, the frame
            #: counts of its spans of that size (an image grid: 1).
            self.span_frames: dict[int, set[int]] = {}

    def parts(self) -> VLMParts:
        inner = self.model.model  # ``LlavaOnevisionModel``
        return VLMParts(inner, inner.vision_tower, inner.multi_modal_projector, inner.language_model)

    # ----------------------------------------------------------------- the anyres layout
    def tokens_per_image(self) -> int:
        """Visual tokens of one crop (``side * side``; ``pack_image_features`` requires exactly that)."""
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def image_layouts(
        self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Per image, the kind (:data:`BASE`, :data:`HIGH_RES`, :data:`NEWLINE`) of each placeholder, and its crops.

        Args:
            image_sizes: ``(I, 2)`` original ``(height, width)`` of each image.
            batch_num_images: ``(B,)`` images per sample; a sample with several gets base crops only (as HF).

        Returns:
            ``(kinds, crops)``: ``I`` tensors ``(tokens_i,)`` in HF's packing order, and crops per image.
        """
        crops = self.crops_per_image(image_sizes, batch_num_images)
        per_crop = self.tokens_per_image()
        # Constant stand-ins (crops, side * side, 1) for the projected crops: base BASE, tiles HIGH_RES (bilinear
        # resizing keeps a constant, up to rounding), newline NEWLINE; HF packs them exactly like the real ones.
        stand_ins = [
            torch.cat([torch.full((1, per_crop, 1), float(BASE)), torch.full((n - 1, per_crop, 1), float(HIGH_RES))])
            for n in crops
        ]
        packed = self._pack(stand_ins, image_sizes, torch.full((1,), float(NEWLINE)))
        return [p[:, 0].round().long() for p in packed], crops

    def crops_per_image(self, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None) -> list[int]:
        """Crops the tower runs on for each image (as HF's ``get_image_features``: only a sample's sole image tiles)."""
        config = self.model.config
        modeling = sys.modules[type(self.inner).__module__]
        sizes = image_sizes.cpu()
        tiled = (
            [True] * len(sizes)
            if batch_num_images is None
            else [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
        )
        return [
            modeling.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            if tile
            else 1
            for size, tile in zip(sizes, tiled, strict=False)
        ]

    def _pack(self, maps: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        """HF's own ``pack_image_features`` on per-crop maps ``(crops_i, side * side, F)``: ``(tokens_i, F)`` each."""
        packed, _ = self.inner.pack_image_features(
            maps, image_sizes.cpu(), image_newline=newline, vision_aspect_ratio=self.model.config.vision_aspect_ratio
        )
        return list(packed)

    # ----------------------------------------------------------------- vision-tower signals
    def install(self, runtime: Any) -> None:
        super().install(runtime)
        if self._tower_capture is None:
            return
        # The tower runs inside get_image_features (in a forward, or before generate()'s first one); only it sees
        # image_sizes, which say how the crops' maps are packed. Wrapped on the instance, deleted on uninstall.
        original = self.inner.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)  # keeps its signature: generate() reads it to route the image arguments
        def recording(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments
            self._tower_layout = (bound["image_sizes"], bound.get("batch_num_images"))
            return original(*args, **kwargs)

        self.inner.get_image_features = recording

    def uninstall(self) -> None:
        vars(self.inner).pop("get_image_features", None)
        self._tower_layout = None
        super().uninstall()

    def tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        # (crops, P, ...) of every image -> packed as HF packs the features: (placeholders, ...), newline rows 0.
        if self._tower_layout is None:
            raise RuntimeError("tokenprune: the tower ran without image sizes; cannot place its signals")
        image_sizes, batch_num_images = self._tower_layout
        maps = signal if signal.ndim == 3 else signal[..., None]  # (C, P, F)
        if self.model.config.vision_feature_select_strategy == "default":
            maps = maps[:, 1:]
        crops = self.crops_per_image(image_sizes, batch_num_images)
        packed = self._pack(list(maps.split(crops)), image_sizes, torch.zeros(maps.shape[-1], dtype=maps.dtype))
        out = torch.cat(packed)  # (placeholders, F)
        return out if signal.ndim == 3 else out[:, 0]

    def feature_layouts(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The kind of each placeholder, read from already packed features (one ``(tokens_i, C)`` per image).

        ``generate()`` encodes the images before the first forward and passes ``mm_encoder_outputs`` instead of
        ``pixel_values``/``image_sizes``. A packed image is its base grid (``side * side`` tokens) first, then
        the high-res grid; its newline tokens are exact copies of ``model.model.image_newline``.
        """
        newline = self.inner.image_newline
        kinds = []
        for feature in features:
            kind = torch.full((feature.shape[0],), HIGH_RES, dtype=torch.long)
            kind[: self.tokens_per_image()] = BASE
            kind[(feature == newline.to(feature.device, feature.dtype)).all(dim=-1).cpu()] = NEWLINE
            kinds.append(kind)
        return kinds

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        """Placeholders (LLM tokens) of one image of ``input_size`` ``(height, width)``, alone in its prompt."""
        if input_size is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} tiles images by their size (anyres): give input_size=(height, width)"
            )
        kinds, _ = self.image_layouts(torch.tensor([list(input_size)]))
        return len(kinds[0])

    def find_visual(self, input_ids: torch.Tensor | None, kwargs: dict) -> VisualInputs | None:
        placeholders = self.visual_mask(input_ids, kwargs)  # (B, L) every image placeholder
        if placeholders is None:
            return None
        visual, structural = placeholders, None
        segments = split_runs(placeholders, None)  # without a layout: each run of placeholders is one span
        kinds, crops = None, []
        if bool(placeholders.any()):  # a prefill with images: forget the last one's crops
            self._crops = [[] for _ in range(placeholders.shape[0])]
            self._video_frames = [0] * placeholders.shape[0]
            image_sizes = kwargs.get("image_sizes")
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if kwargs.get("pixel_values") is not None and image_sizes is not None:
                kinds, crops = self.image_layouts(image_sizes, kwargs.get("batch_num_images"))
            elif encoded is not None and isinstance(encoded.pooler_output, (list, tuple)):  # e.g. from generate()
                kinds = self.feature_layouts(encoded.pooler_output)
                crops = [0] * len(kinds)  # the tower ran before this forward
        if kinds:
            flat = torch.cat(kinds).to(placeholders.device)  # (P,) in HF's masked_scatter order (row-major)
            if flat.numel() == int(placeholders.sum()):  # otherwise HF raises on the count mismatch itself
                image = torch.cat([torch.full_like(k, i) for i, k in enumerate(kinds)]).to(flat.device)  # (P,)
                newline = flat == NEWLINE
                segments = torch.full_like(placeholders, -1, dtype=torch.long)
                segments[placeholders] = torch.where(newline, -1, 2 * image + (flat == HIGH_RES).long())
                structural = torch.zeros_like(placeholders)
                structural[placeholders] = newline
                visual = placeholders & ~structural
                owner = placeholders.nonzero()[:, 0].cpu()  # (P,) sample of every placeholder
                first = torch.tensor([0] + [len(k) for k in kinds[:-1]]).cumsum(0)  # (I,) first placeholder
                for sample, n in zip(owner[first].tolist(), crops, strict=True):
                    self._crops[sample].append(n)
        if not self._onevision_videos:
            return VisualInputs(visual, segments, structural)
        video = self.visual_mask(input_ids, kwargs, self.model.config.video_token_id)  # (B, L)
        if bool(video.any()):  # a prefill with videos: the tower runs on each of their frames
            frames, length = self.video_layout(kwargs)
            if not bool(placeholders.any()):
                self._crops = [[] for _ in range(video.shape[0])]
            ran = kwargs.get("pixel_values_videos") is not None  # not in generate(): encoded before the forward
            self._video_frames = [int(row.sum()) // length * frames if ran and length else 0 for row in video]
        if self.method.whole_videos:
            return self._with_videos(video, kwargs, visual, segments, structural)
        return VisualInputs(visual, segments, structural)

    def video_layout(self, kwargs: dict) -> tuple[int, int]:
        """``(F, placeholders per video)`` of one call's videos (all of one length: ``(V, F, 3, H, W)``), or 0s."""
        vision = self.model.config.vision_config
        per_frame = math.ceil(vision.image_size // vision.patch_size / 2) ** 2  # HF's apply_pooling grid
        pixels = kwargs.get("pixel_values_videos")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if pixels is not None:
            frames = pixels.shape[1]
        elif encoded is not None:  # generate(): (V, F * per_frame + 1, C) pooled features and newline
            frames = (encoded.pooler_output.shape[1] - 1) // per_frame
        else:
            return 0, 0
        return int(frames), int(frames) * per_frame + 1

    def _with_videos(
        self,
        video: torch.Tensor,
        kwargs: dict,
        visual: torch.Tensor,
        segments: torch.Tensor,
        structural: torch.Tensor | None,
    ) -> VisualInputs:
        """:meth:`find_visual`'s spans plus one per video (its newline structural); fills :attr:`span_frames`.

        Raises:
            RuntimeError: Video placeholders whose count is not ``V`` videos of ``F`` frames plus a newline each.
        """
        self.span_frames = {}
        for b in range(visual.shape[0]):  # image grids: one frame each
            for n in torch.unique_consecutive(segments[b][visual[b]], return_counts=True)[1].tolist():
                self.span_frames.setdefault(n, set()).add(1)
        if not bool(video.any()):
            return VisualInputs(visual, segments, structural)
        frames, length = self.video_layout(kwargs)
        if not frames or int(video.sum()) % length:
            raise RuntimeError(
                f"tokenprune: method {self.method.name!r} needs every video's frames: pass pixel_values_videos "
                "(V, F, 3, H, W) with F frames of pooled tokens and one newline per video as placeholders"
            )
        pieces = split_runs(video, length)  # (B, L) one id per video, its newline last
        ends = video & (pieces != torch.roll(pieces, -1, dims=1))  # (B, L) the last placeholder of each video
        structural = ends if structural is None else structural | ends
        segments = torch.where(video & ~ends, pieces + segments.max() + 1, segments)  # after every image span
        self.span_frames.setdefault(length - 1, set()).add(frames)
        return VisualInputs(visual | (video & ~ends), segments, structural)

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def sample_vision_flops(self, state: DecoderState, sample: int) -> float:
        """Vision tower + projector on every crop of the sample's images in the last prefill.

        Videos: one crop's tower per frame. 0 when the tower did not run there (features given as
        ``mm_encoder_outputs``).
        """
        crops = self._crops[sample] if sample < len(self._crops) else []
        frames = self._video_frames[sample] if sample < len(self._video_frames) else 0  # one crop's tower each
        return (sum(crops) + frames) * self.vision_flops()

    def inputs_vision_flops(self, inputs: dict) -> float:
        """The vision tower runs once per crop (from ``image_sizes``) and once per video frame."""
        crops = 0
        if inputs.get("pixel_values") is not None and inputs.get("image_sizes") is not None:
            crops = sum(self.image_layouts(inputs["image_sizes"], inputs.get("batch_num_images"))[1])
        videos = inputs.get("pixel_values_videos") if self._onevision_videos else None  # (V, F, 3, H, W)
        frames = int(videos.shape[0] * videos.shape[1]) if videos is not None else 0  # the tower on every frame
        return (crops + frames) * self.vision_flops()


register_adapter(
    hf_classes("LlavaOnevisionForConditionalGeneration"), LlavaOnevisionAdapter, LlavaOnevisionAdapter.description
)

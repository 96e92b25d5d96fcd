"""``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (transformers 5.x).

Every VLM method (``tokenprune.methods(kind="vlm")``; merging ones with ``merge_positions="original"``) patches
the model in place; ``forward`` and ``generate()`` keep their signatures.
The language-model side (real removal, masks, compact KV cache, decode) is :mod:`tokenprune.adapters.vlm`.
What this file owns:

* **Visual spans per sample** from ``input_ids`` equal to ``config.image_token_id`` or ``config.video_token_id``
  (or, for ``inputs_embeds`` calls, embeddings equal to those tokens'), read by a forward pre-hook on
  ``model.model`` (``Qwen2VLModel``) before it scatters the image and video features. HF lays out one image or
  video of grid ``(t, h, w)`` (patches, from ``image_grid_thw`` / ``video_grid_thw``) as ``t`` temporal slices
  of ``(h / merge) x (w / merge)`` placeholders, row-major: every temporal slice (a video frame; an image has
  ``t = 1``) is its own span, so AIM merges each frame on its own, in spatial order, and never across frames
  or inputs. ``generate()`` encodes images and videos before its first forward and passes no grids: then each
  run of placeholders is one input, split into frames by its M-RoPE ``position_ids`` (every frame's rows and
  columns restart at the same position). In-LLM pruning ranks image and video tokens of a prompt together.
* **M-RoPE positions.** ``get_rope_index`` gives a video token ``(start + frame * interval, start + row,
  start + col)`` (Qwen2.5-VL: ``interval = tokens_per_second * second_per_grid_ts``), text tokens one position on
  all three axes. In transformers 5.x the text model folds the 3-axis positions (``(3, B, N)``, or
  ``(4, B, N)`` from ``generate()`` with text positions first) into ``(cos, sin)`` and the layers use the
  standard ``apply_rotary_pos_emb``; the shared reducer slices ``(cos, sin)``, so every kept token keeps the
  rotary embedding of its *original* 3-axis position. Decode steps use the caller's positions (``generate()``
  adds ``rope_deltas``), which stay right because nothing is renumbered.
* **AIM merging** needs ``merge_positions="original"`` here: a merged token is stored at (and keeps the 3-axis
  position of) one of the tokens of its own frame. ``"compact"`` renumbers 1-D positions and has no meaning for
  M-RoPE grids, so it is refused when merging is on (prune-only ``merge_keep=1.0`` works with either).
* **Whole videos** for temporal methods (a method class with ``whole_videos = True``, e.g. ``dycoke``): each
  video is one span (all its frames, in order; Qwen3-VL's per-frame runs straddle their timestamps) instead of
  one per frame, and :attr:`Qwen2VLAdapter.span_frames` says how many frames a span of each size holds (images:
  1). A video's extent comes from ``video_grid_thw``, or in ``generate()`` from the encoded videos it passes
  (``mm_encoder_outputs``); its frames from the per-frame spans above. Other methods are unaffected.
* ``labels`` are refused while reducing, as for LLaVA.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.state import CacheSession, DecoderState, TowerSequence, VisualInputs
from tokenprune.adapters.vlm.tower import (
    attention_flops,
    expand_rows,
    patch_attention,
    per_sample_flops,
    scatter_tokens,
)
from tokenprune.core.sequence import split_runs
from tokenprune.registry import register_adapter

_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def frame_segments(segments: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Split every segment of ``segments`` ``(B, L)`` (one image or video each, contiguous) into temporal slices.

    Read from the M-RoPE ``positions`` ``(3, B or 1, L)`` (temporal, height, width): ``get_rope_index`` numbers
    the rows and columns of every frame of an input from the same ``(start, start)``, so a frame begins where a
    token's (height, width) equals that of its segment's first token. Returns ``(B, L)`` slice ids (-1 elsewhere).
    """
    batch, length = segments.shape
    visual = segments >= 0
    offsets = torch.arange(length, device=segments.device).expand(batch, length)
    previous = torch.cat([torch.full_like(segments[:, :1], -1), segments[:, :-1]], dim=1)
    first = torch.where(visual & (segments != previous), offsets, 0).cummax(dim=1).values  # (B, L) its segment's start
    height_width = positions[-2:].to(segments.device).expand(2, batch, length)  # (2, B, L)
    at_start = height_width == height_width.gather(2, first.expand(2, batch, length))
    frame_starts = visual & at_start.all(dim=0)
    frames = frame_starts.flatten().long().cumsum(0).view(batch, length) - 1
    return torch.where(visual, frames, -1)


def grid_segments(
    visual: torch.Tensor,
    grid_thw: torch.Tensor | None,
    merge: int,
    per_frame: bool = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, L)`` segment of every placeholder in ``visual`` (in HF's row-major scatter order), -1 elsewhere.

    With ``grid_thw`` ``(G, 3)`` (one ``(t, h, w)`` per image or video, in order) the segment is the index of the
    grid a placeholder belongs to (``t * h * w / merge**2`` placeholders each), or with ``per_frame`` the index
    of its temporal slice (``t`` slices of ``h * w / merge**2`` placeholders per grid, numbered across grids).
    Without ``grid_thw`` (or when the counts disagree) each run of placeholders is one segment; with
    ``per_frame`` and the M-RoPE ``positions`` ``(3, B, L)`` (as ``generate()`` passes them, without the grids)
    runs are split into frames by :func:`frame_segments`.
    """
    if grid_thw is not None:
        grid = grid_thw.to(visual.device).long()
        per_slice = grid[:, 1] * grid[:, 2] // (merge * merge)  # (G,) placeholders of one temporal slice
        counts = per_slice.repeat_interleave(grid[:, 0]) if per_frame else per_slice * grid[:, 0]  # (sum t,) / (G,)
        if int(counts.sum()) == int(visual.sum()):
            rank = visual.flatten().long().cumsum(0) - 1  # (B * L,)
            segment = torch.searchsorted(counts.cumsum(0), rank, right=True).view_as(visual)
            return torch.where(visual, segment, -1)
    runs = split_runs(visual, None)
    return frame_segments(runs, positions) if per_frame and positions is not None else runs


def image_video_segments(
    image: torch.Tensor,
    video: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    merge: int,
    per_frame: bool = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`grid_segments` of image and of video placeholders (both ``(B, L)``) in one ``(B, L)`` tensor.

    Video segments are numbered after every image segment (with both grids: images ``0..I-1``, then videos), so
    no image and video share a segment.
    """
    images = grid_segments(image, image_grid_thw, merge, per_frame, positions)
    videos = grid_segments(video, video_grid_thw, merge, per_frame, positions)
    return torch.where(video, videos + images.max().clamp(min=-1) + 1, images)


@dataclass
class TowerRun:
    """One run of the Qwen2-VL vision tower at the captured block (images, or videos: HF runs them apart).

    Attributes:
        queries: ``(S, H, D)`` rotary-embedded queries of every patch of the run (window order in Qwen2.5-VL).
        keys: ``(S, H, D)`` likewise.
        cu_seqlens: ``(A + 1,)`` bounds of the block's attention segments (frames, or windows).
        grid_thw: ``(G, 3)`` the run's grids.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_thw: torch.Tensor


class QwenTowerCapture:
    """Records a vision block's queries and keys (its fused ``qkv`` output, rotated as the block rotates them)."""

    def __init__(self, tower: nn.Module, layer: int) -> None:
        attn = tower.blocks[layer].attn
        self.heads = attn.num_heads
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        self.runs: list[TowerRun] = []
        self._call: dict = {}
        self._handles = [
            tower.register_forward_pre_hook(self._on_tower, with_kwargs=True),
            attn.register_forward_pre_hook(self._on_attention, with_kwargs=True),
            attn.qkv.register_forward_hook(self._on_qkv),
        ]

    def _on_tower(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._call["grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def _on_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._call["cu_seqlens"], self._call["rotary"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

    def _on_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        rotary = self._call.pop("rotary", None)
        if rotary is None:  # qkv called outside the block's attention: not a tower run
            return
        queries, keys, _ = output.unflatten(-1, (3, self.heads, -1)).unbind(1)  # (S, H, D) each
        queries, keys = self.rope(queries, keys, *rotary)
        self.runs.append(TowerRun(queries, keys, self._call["cu_seqlens"], self._call["grid_thw"]))

    def pop(self) -> list[TowerRun]:
        runs, self.runs = self.runs, []
        return runs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.runs = []


class Qwen2VLAdapter(VLMAdapter):
    """``Qwen2VLForConditionalGeneration`` (and ``Qwen2_5_VLForConditionalGeneration``), images and videos."""

    description = "transformers Qwen2VL/Qwen2.5-VL ForConditionalGeneration"
    layout = "transformers 5.x Qwen2-VL"
    has_static_size = False
    position_axes = 3
    tower_signals = True
    no_tower_merging = (
        "its vision tower is Qwen2-VL's own (windowed attention in 2.5-VL, no tokenprune ViT adapter) and its 2x2 "
        "patch merger folds four patches into each LLM token"
    )

    def __init__(self, model) -> None:
        super().__init__(model)
        self.merge_size = model.config.vision_config.spatial_merge_size
        # Per sample of the last prefill with visual inputs: the (t, h, w) of its images and videos, in order.
        self._grids: list[list[tuple[int, int, int]]] = []
        self._placeholders: tuple[torch.Tensor, torch.Tensor] | None = None  # (image, video) of the last call
        #: With a ``whole_videos`` method: for each span size of the last call with visual inputs, the frame counts
        #: of its spans of that size (an image: 1), e.g. ``{24: {3}, 16: {1}}``.
        self.span_frames: dict[int, set[int]] = {}

    def parts(self) -> VLMParts:
        inner = self.model.model  # ``Qwen2VLModel``
        return VLMParts(inner, inner.visual, inner.visual.merger, inner.language_model)

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        if input_size is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} has dynamic resolution: give input_size=(height, width)"
            )
        patch = self.model.config.vision_config.patch_size * self.merge_size
        return (input_size[0] // patch) * (input_size[1] // patch)

    # ----------------------------------------------------------------- visual spans, decode positions
    def decode_kwargs(self, input_ids: torch.Tensor | None, kwargs: dict, session: CacheSession) -> dict | None:
        deltas = getattr(self.inner, "rope_deltas", None)
        if not session.merged or kwargs.get("position_ids") is not None or deltas is None:
            return None
        # HF would number the new tokens from the compact cache's length; the caller's sequence is longer.
        x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        batch, q_len = x.shape[:2]
        steps = session.external_length + torch.arange(q_len, device=x.device)  # (q,)
        deltas = deltas.to(x.device).repeat_interleave(batch // deltas.shape[0], dim=0)  # (B, 1)
        kwargs["position_ids"] = (steps[None, :] + deltas)[None].expand(3, batch, q_len)
        return kwargs

    def find_visual(self, input_ids: torch.Tensor | None, kwargs: dict) -> VisualInputs | None:
        image = self.visual_mask(input_ids, kwargs)
        if image is None:
            return None
        video = self.visual_mask(input_ids, kwargs, self.model.config.video_token_id)
        grids_thw = kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")
        positions = kwargs.get("position_ids")  # (3 or 4, B, L) from generate(), which encodes without the grids
        positions = positions if isinstance(positions, torch.Tensor) and positions.ndim == 3 else None
        frames = image_video_segments(image, video, *grids_thw, self.merge_size, per_frame=True, positions=positions)
        visual = image | video
        self._placeholders = (image, video)
        spans = frames
        if self.method.whole_videos:
            spans = self._whole_videos(image, video, frames, kwargs)
        if bool(visual.any()):  # per sample, the (t, h, w) of its images and videos in order (for FLOPs)
            inputs = image_video_segments(image, video, *grids_thw, self.merge_size).cpu()  # (B, L) which input
            grids = [tuple(g) for thw in grids_thw if thw is not None for g in thw.tolist()]
            order = [torch.unique_consecutive(row[row >= 0]).tolist() for row in inputs]
            valid = all(0 <= i < len(grids) for ids in order for i in ids)
            self._grids = [[grids[i] for i in ids] for ids in order] if valid else []
        return VisualInputs(visual, spans)

    def _whole_videos(
        self, image: torch.Tensor, video: torch.Tensor, frames: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """``(B, L)`` segments with each video whole (images as in ``frames``); fills :attr:`span_frames`.

        Raises:
            RuntimeError: Videos whose extent neither ``video_grid_thw`` nor ``mm_encoder_outputs`` gives.
        """
        self.span_frames = {}
        for b in range(image.shape[0]):  # an image is one frame
            for n in torch.unique_consecutive(frames[b][image[b]], return_counts=True)[1].tolist():
                self.span_frames.setdefault(n, set()).add(1)
        if not bool(video.any()):
            return frames
        grid = kwargs.get("video_grid_thw")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("video")
        if grid is not None:
            counts = grid.long().prod(dim=1) // self.merge_size**2  # (V,) placeholders of each video
        elif encoded is not None:  # generate(): one feature row per placeholder of each video
            counts = torch.tensor([len(features) for features in encoded.pooler_output])
        else:
            counts = None
        if counts is None or int(counts.sum()) != int(video.sum()):
            raise RuntimeError(
                f"tokenprune: method {self.method.name!r} needs every video's extent: pass video_grid_thw with "
                "the video placeholders (or call generate(), which passes the encoded videos)"
            )
        rank = video.flatten().long().cumsum(0) - 1  # (B * L,) index of each video placeholder
        which = torch.searchsorted(counts.to(video.device).cumsum(0), rank, right=True).view_as(video)  # (B, L)
        for v, n in enumerate(counts.tolist()):
            inside = video & (which == v)
            self.span_frames.setdefault(n, set()).add(int(torch.unique(frames[inside]).numel()))
        return torch.where(video, which + frames.max() + 1, frames)  # video ids after every frame id

    # ----------------------------------------------------------------- vision-tower signals
    def tower_layer_list(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def tower_capture(self, layer: int) -> QwenTowerCapture:
        return QwenTowerCapture(self.vision_tower, layer)

    def tower_sequence(self, found: VisualInputs, runs: list[TowerRun]) -> TowerSequence | None:
        """Mean attention each patch receives within its attention segment, and keys, per LLM token.

        A token is ``merge**2`` patches, consecutive in the tower (the patch merger's unit): its entries are their
        mean. Qwen2.5-VL runs its blocks in window order; the tokens are put back in image order as its merger
        output is. HF runs images first, then videos: the runs are scattered onto image, then video placeholders.
        """
        image, video = self._placeholders
        kinds = [mask for mask in (image, video) if bool(mask.any())]
        if len(runs) < len(kinds):
            return None
        runs = runs[len(runs) - len(kinds) :]  # the latest: this call's images, then videos
        tower, unit = self.vision_tower, self.merge_size**2
        attention = torch.zeros(image.shape, device=image.device)
        keys, owners, costs = None, torch.full(image.shape, -1, dtype=torch.long, device=image.device), []
        for run, placeholders in zip(runs, kinds, strict=True):
            bounds = run.cu_seqlens.tolist()
            heads, dim = run.queries.shape[1:]
            queries, keys_heads = run.queries.transpose(0, 1)[None], run.keys.transpose(0, 1)[None]  # (1, H, S, D)
            segments = list(zip(bounds[:-1], bounds[1:], strict=True))
            received = torch.cat(
                [patch_attention(queries[:, :, a:b], keys_heads[:, :, a:b], False)[0] for a, b in segments]
            )  # (S,) attention each patch receives within its own frame or window
            segment = torch.cat([torch.full((b - a,), len(costs) + i) for i, (a, b) in enumerate(segments)])
            costs += [attention_flops(b - a, heads, dim, False) for a, b in segments]
            token_attention = received.view(-1, unit).mean(dim=1)  # (S / unit,)
            token_keys = run.keys.float().mean(dim=1).unflatten(0, (-1, unit)).mean(dim=1)  # (S / unit, D)
            token_segment = segment.view(-1, unit)[:, 0]  # a merged token never straddles frames or windows
            if getattr(tower, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: back from window order
                window_index, _ = sys.modules[type(tower).__module__].get_vision_window_index(
                    run.grid_thw, tower.spatial_merge_size, tower.window_size, tower.patch_size
                )
                order = window_index.argsort()
                token_attention, token_keys, token_segment = (
                    t[order] for t in (token_attention, token_keys, token_segment)
                )
            rows = [expand_rows(t, placeholders) for t in (token_attention, token_keys, token_segment)]
            if any(t is None for t in rows):
                return None
            attention = attention + scatter_tokens(rows[0], placeholders)
            scattered = scatter_tokens(rows[1], placeholders)
            keys = scattered if keys is None else keys + scattered
            owners[placeholders] = rows[2].to(owners.device)
        flops = per_sample_flops(owners[image | video], image | video, torch.tensor(costs))
        layer = self.reducer.runtime.method.tower_layer % len(tower.blocks)
        return TowerSequence(layer, attention, keys, False, flops)

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def vision_flops(self, tokens: int | None = None, grid: tuple[int, int, int] | None = None) -> float:
        """Vision tower + patch merger FLOPs for one image of ``tokens`` LLM tokens (``t * h * w / merge**2``).

        ``grid`` ``(t, h, w)`` (patches) is needed for Qwen2.5-VL's windowed attention blocks; without it they
        are counted as full attention over the image (an upper bound).
        """
        if tokens is None:
            raise NotImplementedError("Qwen2-VL vision FLOPs depend on the image size: pass its LLM token count")
        tower, merge = self.vision_tower, self.merge_size
        patches = tokens * merge**2
        frames = [patches] if grid is None else [grid[1] * grid[2]] * grid[0]  # attention runs per frame
        windows = frames
        full_blocks = getattr(tower, "fullatt_block_indexes", None)
        if full_blocks is not None and grid is not None:  # Qwen2.5-VL: windows of `side` x `side` LLM tokens
            side = tower.window_size // merge // tower.patch_size
            rows, cols = grid[1] // merge, grid[2] // merge
            chunks_h = [min(side, rows - r) for r in range(0, rows, side)]
            chunks_w = [min(side, cols - c) for c in range(0, cols, side)]
            windows = [a * b * merge**2 for a in chunks_h for b in chunks_w] * grid[0]
        flops = 2.0 * patches * tower.patch_embed.proj.weight.numel()
        for index, block in enumerate(tower.blocks):
            dim = block.attn.qkv.in_features
            spans = frames if full_blocks is None or index in full_blocks else windows
            flops += 2.0 * patches * (linear_macs(block.attn) + linear_macs(block.mlp))
            flops += 4.0 * dim * sum(n * n for n in spans)
        return flops + 2.0 * tokens * linear_macs(tower.merger)

    def static_image_flops(self) -> float:
        return 0.0  # image sizes vary per prompt: flops_for counts the tower from a forward

    def grids_vision_flops(self, grids: list[tuple[int, int, int]]) -> float:
        """Vision tower + merger FLOPs of images / videos of these ``(t, h, w)`` grids."""
        return sum(self.vision_flops(t * h * w // self.merge_size**2, (t, h, w)) for t, h, w in grids)

    def inputs_vision_flops(self, inputs: dict) -> float:
        """The tower on every image / video of one call (``image_grid_thw`` / ``video_grid_thw``)."""
        pairs = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))
        grids = [tuple(g) for p, key in pairs if inputs.get(p) is not None for g in inputs[key].tolist()]
        return self.grids_vision_flops(grids)

    def sample_vision_flops(self, state: DecoderState, sample: int) -> float:
        """The sample's images and videos (their grids from the forward; else each span as one image of its size)."""
        spans = state.spans[sample]  # placeholders per temporal slice
        grids = self._grids[sample] if sample < len(self._grids) else []
        per_frame = [h * w // self.merge_size**2 for t, h, w in grids for _ in range(t)]
        if spans in (per_frame, [t * h * w // self.merge_size**2 for t, h, w in grids]):  # or whole videos
            return self.grids_vision_flops(grids)
        return sum(self.vision_flops(n) for n in spans)


register_adapter(hf_classes(*_CLASSES), Qwen2VLAdapter, Qwen2VLAdapter.description)

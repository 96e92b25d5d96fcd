"""Adapter for Hugging Face ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` (5.x).

``tokenprune.apply(qwen2_vl, "fastv", k=2, keep=0.5)`` or ``tokenprune.apply(qwen2_vl, "aim", merge_keep=0.25,
merge_positions="original")`` patches the model in place; ``forward`` and ``generate()`` keep their signatures.
The language-model side (real removal, masks, compact KV cache, decode) is
:mod:`tokenprune.adapters.hf_decoder`, shared with LLaVA. What this file owns:

* **Visual spans per sample** from ``input_ids == config.image_token_id`` (or, for ``inputs_embeds`` calls,
  embeddings equal to the image token's), read by a forward pre-hook on ``model.model`` (``Qwen2VLModel``)
  before it scatters the image features. Images are told apart by ``image_grid_thw`` (each image holds
  ``t * h * w / merge**2`` placeholders, in order); without it each run of placeholders is one image. Video
  placeholders are left alone (treated like text).
* **M-RoPE positions.** In transformers 5.x the text model folds the 3-axis positions (``(3, B, N)``, or
  ``(4, B, N)`` from ``generate()`` with text positions first) into ``(cos, sin)`` and the layers use the
  standard ``apply_rotary_pos_emb``; the shared reducer slices ``(cos, sin)``, so every kept token keeps the
  rotary embedding of its *original* 3-axis position. Decode steps use the caller's positions (``generate()``
  adds ``rope_deltas``), which stay right because nothing is renumbered.
* **AIM merging** needs ``merge_positions="original"`` here: a merged token is stored at (and keeps the 3-axis
  position of) one of the tokens of its own image. ``"compact"`` renumbers 1-D positions and has no meaning for
  M-RoPE grids, so it is refused when merging is on (prune-only ``merge_keep=1.0`` works with either).
* ``labels`` are refused while reducing, as for LLaVA.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import Adapter, linear_macs
from tokenprune.adapters.hf_llava import HFLlavaAdapter, visual_segments
from tokenprune.registry import register_adapter

_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def _is_qwen2_vl(model: Any) -> bool:
    module = sys.modules.get("transformers")
    if module is None or not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return False
    classes = tuple(c for c in (getattr(module, name, None) for name in _CLASSES) if c is not None)
    return bool(classes) and isinstance(model, classes)


def image_segments(visual: torch.Tensor, image_grid_thw: torch.Tensor | None, merge: int) -> torch.Tensor:
    """``(B, L)`` image index of every image placeholder (in HF's row-major scatter order), -1 for text.

    With ``image_grid_thw`` the placeholders are split into images of ``t * h * w / merge**2`` tokens; without
    it (or when the counts disagree) each run of placeholders is one image.
    """
    if image_grid_thw is not None:
        counts = image_grid_thw.to(visual.device).prod(dim=-1) // (merge * merge)  # (I,)
        if int(counts.sum()) == int(visual.sum()):
            rank = visual.flatten().long().cumsum(0) - 1  # (B * L,)
            image = torch.searchsorted(counts.cumsum(0), rank, right=True).view_as(visual)
            return torch.where(visual, image, -1)
    return visual_segments(visual, None)


class HFQwen2VLAdapter(HFLlavaAdapter):
    """``Qwen2VLForConditionalGeneration`` (and ``Qwen2_5_VLForConditionalGeneration``), images only."""

    description = "transformers Qwen2VL/Qwen2.5-VL ForConditionalGeneration (vision-language methods: fastv, aim)"
    has_static_size = False

    def __init__(self, model: nn.Module) -> None:  # noqa: D107 - not HFLlavaAdapter's layout
        Adapter.__init__(self, model)
        inner = model.model  # the ``Qwen2VLModel``, kept as ``self.llava`` so the shared LLaVA code paths apply
        self._attach(inner, inner.visual, inner.visual.merger, "transformers 5.x Qwen2-VL")
        self.merge_size = model.config.vision_config.spatial_merge_size
        self._grids: list[list[tuple[int, int, int]]] = []  # per sample of the last prefill: its images' grids

    def resolve_schedule(self, runtime: Any) -> list[float] | None:
        schedule = super().resolve_schedule(runtime)
        config = runtime.config
        merges = getattr(config, "flops", None) is not None or (getattr(config, "merge_keep", None) or 1.0) < 1.0
        if merges and getattr(config, "merge_positions", "original") == "compact":
            raise NotImplementedError(
                f"aim merging on {type(self.model).__name__} needs merge_positions='original' (each merged token "
                "keeps the 3-axis M-RoPE position of a token of its own image); merge_positions='compact' "
                "renumbers 1-D positions only. Prune-only aim (merge_keep=1.0) works with either."
            )
        return schedule

    def tokens_per_image(self) -> int:
        raise NotImplementedError(
            f"{type(self.model).__name__} has dynamic resolution: visual tokens per image come from image_grid_thw"
        )

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        if input_size is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} has dynamic resolution: give input_size=(height, width)"
            )
        patch = self.model.config.vision_config.patch_size * self.merge_size
        return (input_size[0] // patch) * (input_size[1] // patch)

    # ----------------------------------------------------------------- visual spans, decode positions
    def _find_visual(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        session = self.reducer.sessions.get(cache) if cache is not None else None
        deltas = getattr(self.llava, "rope_deltas", None)
        if session is not None and session.merged and kwargs.get("position_ids") is None and deltas is not None:
            # HF would number the new tokens from the compact cache's length; the caller's sequence is longer.
            x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            batch, q_len = x.shape[:2]
            steps = session.external_length + torch.arange(q_len, device=x.device)  # (q,)
            deltas = deltas.to(x.device).repeat_interleave(batch // deltas.shape[0], dim=0)  # (B, 1)
            kwargs["position_ids"] = (steps[None, :] + deltas)[None].expand(3, batch, q_len)
            return args, kwargs
        visual = self.visual_mask(input_ids, kwargs)
        if visual is None:
            return
        grid_thw = kwargs.get("image_grid_thw")
        segments = image_segments(visual, grid_thw, self.merge_size)
        self.reducer.pending_visual = (visual, segments)
        if grid_thw is not None and bool(visual.any()):  # per sample, the (t, h, w) of its images (for FLOPs)
            grids = [tuple(g) for g in grid_thw.tolist()]
            images = [sorted(set(row[row >= 0].tolist())) for row in segments.cpu()]
            if all(0 <= i < len(grids) for ids in images for i in ids):
                self._grids = [[grids[i] for i in ids] for ids in images]

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

    def embed_flops(self, num_tokens: int) -> float:
        return self.vision_flops(num_tokens)

    def analytic_flops(
        self, num_tokens: int, schedule: list[int], method: Any = None, rows: int = 1, num_images: int = 1
    ) -> dict:
        """Per-layer LLM FLOPs of one prompt, as :meth:`HFLlavaAdapter.analytic_flops`.

        ``embed`` is 0: image sizes vary per prompt (:meth:`flops_for` counts the vision tower from a forward).
        """
        reducer = self._reducer_like()
        table, tokens = [], num_tokens
        for layer, removed in enumerate(schedule):
            overhead = reducer.score_flops(rows, tokens) if removed > 0 else 0.0
            flops = reducer.layer_flops(layer, tokens) + overhead
            row = {"layer": layer, "tokens_in": tokens, "tokens_out": tokens - removed, "flops": flops}
            table.append({**row, "method_flops": overhead})
            tokens -= removed
        head = self.head_flops(tokens)
        return {"embed": 0.0, "head": head, "total": head + sum(r["flops"] for r in table), "layers": table}

    def flops_for(self, state: Any, sample: int = 0) -> dict:
        """Analytic FLOPs (2 x MAC) of one sample of a reduced forward, from ``patch.state``.

        ``embed``: vision tower and merger for the sample's images (sizes from its visual spans), plus merging
        before the LLM; ``layers`` and ``head`` as for LLaVA.
        """
        table = self._reducer_like().sample_flops(state, sample)
        spans = state.spans[sample]
        grids = self._grids[sample] if sample < len(self._grids) else []
        grids = grids if [t * h * w // self.merge_size**2 for t, h, w in grids] == spans else [None] * len(spans)
        embed = sum(self.vision_flops(n, g) for n, g in zip(spans, grids, strict=True)) + table["merge"]
        head = self.head_flops(table["layers"][-1]["tokens_out"])
        layers = table["layers"]
        total = embed + head + sum(row["flops"] for row in layers)
        return {"embed": embed, "merge": table["merge"], "head": head, "total": total, "layers": layers}


register_adapter(_is_qwen2_vl, HFQwen2VLAdapter, HFQwen2VLAdapter.description)

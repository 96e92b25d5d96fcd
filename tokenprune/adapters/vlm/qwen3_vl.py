"""``Qwen3VLForConditionalGeneration`` / ``Qwen3VLMoeForConditionalGeneration`` (transformers 5.x), with DeepStack.

Every VLM method (``tokenprune.methods(kind="vlm")``; merging ones with ``merge_positions="original"``) patches
the model in place; ``forward`` and ``generate()`` keep their signatures. What Qwen3-VL shares with Qwen2-VL is
inherited from :mod:`.qwen2_vl` (spans, M-RoPE positions, decode positions, tower signals, FLOPs); this file owns
what is new:

* **DeepStack.** The vision tower also returns, for ``k`` of its layers, features of every visual token (one
  patch merger each, ``deepstack_merger_list``); the text model adds level ``l`` to the hidden states of the
  visual positions after decoder layer ``l < k`` (``Qwen3VLTextModel._deepstack_process``, given
  ``visual_pos_masks`` ``(B, L)`` and ``deepstack_visual_embeds``: ``k`` x ``(n_visual, C)`` in placeholder
  order). With tokens reduced, both follow the shorter sequence:

  - *before the LLM*: a forward pre-hook on the text model, after the reducer's own, lays every level out per
    input position ``(B, L, C)`` (:func:`deepstack_rows`): a token kept as it is carries its own row, a merged
    token the mean of its group's rows (every input token counts once, as in the merged embeddings; the groups
    are ``DecoderState.source``);
  - *inside the LLM*: ``_deepstack_process`` is wrapped on the text model instance (the wrapper removed on
    uninstall): HF's own function runs on the current state's visual mask and the rows gathered at the
    current tokens' input positions (``DecoderState.index``), so a level added after a pruning layer goes to the
    kept visual tokens only.

  Nothing is rewritten when nothing is reduced (outputs bit-equal to the unpatched model).
* **Positions.** The text model reads ``(3, B, L)`` M-RoPE positions (``(4, B, L)`` from ``generate()``: its first
  row the text positions the mask and layers receive); the reducer gathers every row, so kept tokens keep their
  original positions on every axis.
* **Video.** The processor writes each temporal slice of a video as its own run of placeholders between
  ``<vision_start>`` / ``<vision_end>``, after a timestamp (text tokens, kept like text): every slice is a span
  (from ``video_grid_thw``, or, in ``generate()``, one run each).
* **Tower.** The same block layout as Qwen2.5-VL without windows (``blocks[i].attn.qkv``, 2-D rotary, attention
  per frame by ``cu_seqlens``), plus a learned position embedding interpolated to each grid (no matmul) and the
  DeepStack mergers (counted in the vision FLOPs). Tower signals for ``visionzip`` / ``vispruner``: the mean
  attention each patch receives within its frame (no class token), averaged over the ``merge**2`` patches of a
  token (:class:`~tokenprune.adapters.vlm.qwen2_vl.QwenTowerCapture`).
* **MoE** (Qwen3-VL-MoE): the same layout; sparse MLP blocks are counted as their router plus ``top_k`` experts
  per token (:class:`MoEDecoderFlops`). The analytic count equals torch's flop counter only where the experts run
  as matmuls it sees (``experts_implementation="eager"``; the counter does not count ``grouped_mm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vlm.flops import DecoderFlops
from tokenprune.adapters.vlm.layer import DecoderSpec
from tokenprune.adapters.vlm.qwen2_vl import Qwen2VLAdapter
from tokenprune.registry import register_adapter

_CLASSES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")


def deepstack_rows(mask: torch.Tensor, embeds: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """One DeepStack level laid out per input position, after merging before the LLM: ``(B, L, C)``.

    Args:
        mask: ``(B, L)`` visual positions (``visual_pos_masks``), ``embeds`` ``(n, C)`` their rows in that order.
        source: ``(B, L)`` the input position of the token standing for each input position (-1: dropped); None
            (nothing merged): every token stands for itself.

    Returns:
        Row ``p`` of sample ``b``: the mean of the rows of the visual positions whose source is ``p`` (its own row
        where it stands for itself only); zeros where no visual position stands for ``p``.
    """
    batch, length = mask.shape
    dense = embeds.new_zeros(batch, length, embeds.shape[-1])
    dense[mask] = embeds.to(dense.dtype)
    if source is None:
        return dense
    member = (mask & (source >= 0)).to(torch.float32)  # (B, L) visual positions some kept token stands for
    target = source.clamp(min=0)[..., None].expand_as(dense)  # (B, L, C)
    sums = torch.zeros(dense.shape, dtype=torch.float32, device=dense.device)
    sums.scatter_add_(1, target, dense.float() * member[..., None])
    counts = torch.zeros(batch, length, dtype=torch.float32, device=dense.device)
    counts.scatter_add_(1, source.clamp(min=0), member)
    return torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], 0).to(dense.dtype)


class MoEDecoderFlops(DecoderFlops):
    """:class:`DecoderFlops` where a layer's MLP may be a sparse MoE block (``gate`` router + ``experts``).

    Per token, a sparse block costs its router (``hidden x num_experts``) and ``top_k`` experts (gate, up and down
    projections of ``moe_intermediate_size``); dense MLPs count their linears as usual.
    """

    def __init__(self, language_model: nn.Module, spec: DecoderSpec) -> None:
        super().__init__(language_model, spec)
        config = language_model.config
        macs = []
        for layer, (attn, mlp) in zip(language_model.layers, self._macs, strict=True):
            block = getattr(layer, spec.mlp)
            if hasattr(block, "experts") and hasattr(block, "gate"):
                experts = block.experts
                expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()  # one expert, per token
                mlp = block.gate.weight.numel() + config.num_experts_per_tok * expert
            macs.append((attn, mlp))
        self._macs = macs


class Qwen3VLAdapter(Qwen2VLAdapter):
    """``Qwen3VLForConditionalGeneration`` (and its MoE variant), images and videos, DeepStack features."""

    description = "transformers Qwen3VL/Qwen3VLMoe ForConditionalGeneration"
    layout = "transformers 5.x Qwen3-VL"
    no_tower_merging = (
        "its vision tower is Qwen3-VL's own (no tokenprune ViT adapter), its 2x2 patch merger folds four patches "
        "into each LLM token, and DeepStack mergers read several of its layers"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        owner = type(model).__name__
        for module, name in ((self.language_model, "_deepstack_process"), (self.vision_tower, "deepstack_merger_list")):
            if not hasattr(module, name):
                raise TypeError(
                    f"{type(module).__name__} of {owner} has no {name!r}: not the DeepStack layout tokenprune knows "
                    f"({self.layout})"
                )
        self.llm_flops = MoEDecoderFlops(self.language_model, self.decoder)
        self._deepstack: list[torch.Tensor] = []  # this forward's levels as laid out at the text model's entry
        self._deepstack_handles: list[Any] = []

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        super().install(runtime)  # the reducer's entry hook first: ours reads the state it makes
        lm = self.language_model
        self._deepstack_handles = [
            lm.register_forward_pre_hook(self._deepstack_entry, with_kwargs=True),
            lm.register_forward_hook(self._deepstack_exit, always_call=True),
        ]
        original = lm._deepstack_process  # the bound method of the class

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            fwd = self.reducer.forward_in_flight if self.reducer is not None else None
            if fwd is None or not any(visual_embeds is level for level in self._deepstack):
                return original(hidden_states, visual_pos_masks, visual_embeds)
            state = fwd.state
            index = state.index.clamp(min=0).to(visual_embeds.device)  # (B, N) input position of each token
            rows = visual_embeds.gather(1, index[..., None].expand(-1, -1, visual_embeds.shape[-1]))  # (B, N, C)
            return original(hidden_states, state.visual, rows[state.visual.to(rows.device)])

        lm.__dict__["_deepstack_process"] = deepstack_process  # shadows the class's method until uninstall

    def uninstall(self) -> None:
        for handle in self._deepstack_handles:
            handle.remove()
        self._deepstack_handles, self._deepstack = [], []
        self.language_model.__dict__.pop("_deepstack_process", None)
        super().uninstall()

    def _deepstack_entry(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Lay the DeepStack levels out per input position of a reduced prefill (:func:`deepstack_rows`)."""
        self._deepstack = []
        fwd = self.reducer.forward_in_flight if self.reducer is not None else None
        levels, mask = kwargs.get("deepstack_visual_embeds"), kwargs.get("visual_pos_masks")
        if fwd is None or fwd.decode or not fwd.active or levels is None or mask is None:
            return None  # nothing reduced (or no visual input): HF's own call, untouched
        state = fwd.state
        mask = mask.to(state.index.device)
        source = state.source.to(mask.device) if state.merged else None
        self._deepstack = [deepstack_rows(mask, level.to(mask.device), source) for level in levels]
        kwargs["deepstack_visual_embeds"] = self._deepstack
        kwargs["visual_pos_masks"] = state.visual  # the compact sequence's (the wrapper reads the current state's)
        return args, kwargs

    def _deepstack_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._deepstack = []

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def vision_flops(self, tokens: int | None = None, grid: tuple[int, int, int] | None = None) -> float:
        """Qwen2-VL's count (:meth:`Qwen2VLAdapter.vision_flops`) plus the DeepStack mergers on every token."""
        flops = super().vision_flops(tokens, grid)
        return flops + 2.0 * tokens * sum(linear_macs(m) for m in self.vision_tower.deepstack_merger_list)


register_adapter(hf_classes(*_CLASSES), Qwen3VLAdapter, Qwen3VLAdapter.description)

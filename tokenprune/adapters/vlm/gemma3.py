"""``Gemma3ForConditionalGeneration`` (transformers 5.x): pooled SigLIP images, sliding-window and global layers,
bidirectional attention within each image.

**Layout.** The SigLIP tower's ``s x s`` patch grid (``image_size / patch_size``: 64 x 64 at 896 px) is average-pooled
by ``k x k`` windows to ``mm_tokens_per_image`` tokens (16 x 16 = 256), normed and projected. Each image, and with
pan-and-scan each crop (its own row of ``pixel_values``), fills one run of ``image_token_id`` placeholders that the
processor wraps as ``\\n\\n<start_of_image> [IMG] x 256 <end_of_image>\\n\\n``: one span per image or crop (a run
split every ``mm_tokens_per_image``); the begin/end-of-image tokens are text. Tower signals (visionzip, vispruner):
SigLIP has no class token, so the mean attention each patch receives, and its keys, pooled as HF pools the features
(the mean of each ``k x k`` window). ToMe inside the tower is refused: a pooling window does not map onto merged
tower tokens.

**Masks.** ``Gemma3Model`` builds one mask per layer type before its text model runs: causal, OR'd in prefill with a
bidirectional block per image (each run of ``token_type_ids == 1``), and for ``sliding_attention`` layers AND'ed with
the window ``kv > q - sliding_window``. The reducer reads and rewrites a 2-D mask at the text model's entry, so this
adapter hands it the inner model's 2-D mask, then gives the layers:

* nothing rewritten (zero reduction, text-only prompts, in-LLM pruning before its first removal, a cache tokenprune
  did not fill): HF's own masks, untouched (bit-exact);
* merged before the LLM: what HF's own builder (``create_masks_for_vision_model``) makes for the shorter sequence,
  from the compacted 2-D mask and each kept token's image block (its original block id, gathered);
* after an in-LLM removal: the same builder on the current tokens, the mask of the layer's own type, and the
  rotary ``(cos, sin)`` of its own type (local and global layers use different RoPE bases): HF's own, gathered at
  the kept tokens;
* a decode step on a layer whose cache is compact: HF's builder of that type sized from that layer's cache
  (``layer_idx``) and its own key validity; no image block (HF passes none when decoding).

**The sliding window counts the tokens a layer holds** (kept tokens, in order; fill slots are left of them), not
the original positions: HF's window is over cache positions, and ``DynamicSlidingWindowLayer`` keeps the last
``sliding_window - 1`` tokens that entered the layer, so this is the one definition the cache can follow. With
nothing removed it is HF's own window.

**Importance.** Scoring rows are text tokens (AIM) or the last prompt token (FastV): they attend causally (the
image block only widens image rows), so the reducer's causal rows are exact at a global layer. At a sliding layer
they are exact while each sample's tokens fit in the window; a removal scored at a sliding layer on a longer prompt
is refused before the forward runs (NotImplementedError: score at a global layer instead). HF's Gemma 3 attention
applies no logit softcapping (``attn_logit_softcapping`` is not passed to its attention function in transformers
5.x), so the scoring applies none either. The queries and keys are read after ``q_norm`` / ``k_norm``, which Gemma 3
applies per head after the head split (``(B, H, N, D)``, unlike Qwen3's ``(B, N, H, D)``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import hf_classes
from tokenprune.adapters.capture import QKCapture
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.flops import vit_tower_flops
from tokenprune.adapters.vlm.masks import refuse_4d_mask
from tokenprune.core.sequence import gather_seq
from tokenprune.registry import register_adapter

SLIDING, FULL = "sliding_attention", "full_attention"
#: What the modeling module must provide (HF's own mask builders and block ids).
HF_FUNCTIONS = ("create_masks_for_vision_model", "get_block_sequence_ids_for_mask", "create_masks_for_generate")


def pooled_tokens(signal: torch.Tensor, kernel: int) -> torch.Tensor:
    """A per-patch signal ``(I, s * s, ...)`` of row-major ``s x s`` grids -> ``(I * (s / k) ** 2, ...)``.

    The mean over each ``kernel x kernel`` window, row-major, as ``Gemma3MultiModalProjector``'s ``AvgPool2d``.
    """
    side = int(round(signal.shape[1] ** 0.5))
    pooled = side // kernel
    grid = signal.unflatten(1, (side, side))  # (I, s, s, ...)
    blocks = grid.unflatten(1, (pooled, kernel)).unflatten(3, (pooled, kernel))  # (I, n, k, n, k, ...)
    return blocks.mean(dim=(2, 4)).flatten(0, 2)


def scored_after(state: Any, layer: int) -> bool:
    """Whether the plan removes visual tokens after ``layer`` (so the layer's attention scores them)."""
    targets = state.targets_list
    if layer + 1 >= len(targets):
        return False
    return any(after < before for before, after in zip(targets[layer], targets[layer + 1], strict=True))


class Gemma3Adapter(VLMAdapter):
    """``Gemma3ForConditionalGeneration``: pooled SigLIP images, sliding/global layers, bidirectional image blocks."""

    description = "transformers Gemma3ForConditionalGeneration"
    tower_signals = True
    no_tower_merging = "its projector average-pools each k x k window of tower patches into one LLM token"
    sliding_attention = True
    layout = "Gemma 3, transformers 5.x"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        owner = type(model).__name__
        config = self.language_model.config
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError(
                f"{owner}'s text model attends bidirectionally (use_bidirectional_attention=True); tokenprune "
                "removes visual tokens in causal decoders only"
            )
        module = sys.modules[type(self.inner).__module__]
        missing = [name for name in HF_FUNCTIONS if not hasattr(module, name)]
        missing += [name for name in ("rotary_emb",) if not hasattr(self.language_model, name)]
        attn = getattr(self.language_model.layers[0], self.decoder.attn)
        missing += [
            f"{self.decoder.attn}.{n}" for n in (self.decoder.q_norm, self.decoder.k_norm) if not hasattr(attn, n)
        ]
        missing += [
            f"multi_modal_projector.{name}"
            for name in ("mm_input_projection_weight", "kernel_size", "patches_per_image")
            if not hasattr(self.projector, name)
        ]
        if missing:
            raise TypeError(f"{owner} is not the {self.layout} layout tokenprune knows: missing {missing}")
        self._hf = {name: getattr(module, name) for name in HF_FUNCTIONS}
        self.layer_types: list[str] = list(config.layer_types)
        self.window: int | None = config.sliding_window
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown or (SLIDING in self.layer_types and self.window is None):
            raise NotImplementedError(f"{owner}: layer types {unknown or [SLIDING]} without a known mask")
        # Per inner-model call / per text-model forward (reset at each entry).
        self._call: dict | None = None  # the inner model's 2-D mask and token_type_ids
        self._hf_masks: dict | None = None  # the masks HF built for the text model's input
        self._blocks: torch.Tensor | None = None  # (B, L) image block of each input position, -1: none
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # HF's (cos, sin) per layer type
        self._current: dict[tuple[int, str], tuple[Any, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._masks: tuple[int, dict] | None = None

    # ----------------------------------------------------------------- the family's hooks
    def parts(self) -> VLMParts:
        inner = self.model.model  # ``Gemma3Model``
        for name in ("vision_tower", "multi_modal_projector", "language_model"):
            if not hasattr(inner, name):
                raise TypeError(f"{type(inner).__name__} has no {name!r}: not the {self.layout} layout")
        return VLMParts(inner, inner.vision_tower, inner.multi_modal_projector, inner.language_model)

    def tokens_per_image(self) -> int:
        """LLM tokens per image (or crop): ``mm_tokens_per_image``, the pooled patch grid."""
        return int(self.model.config.mm_tokens_per_image)

    def tower_tokens(self, signal: torch.Tensor) -> torch.Tensor:
        return pooled_tokens(signal, int(self.projector.kernel_size))

    def vision_flops(self) -> float:
        """SigLIP tower + projector (one ``(T x Dv) @ (Dv x Dt)`` matmul; pooling and norm are not matmuls)."""
        tower = vit_tower_flops(self.vision_tower, self.vision_tower.config)
        return tower + 2.0 * self.tokens_per_image() * self.projector.mm_input_projection_weight.numel()

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        super().install(runtime)
        lm, reducer = self.language_model, self.reducer
        reducer.sliding_windows = [self.window if kind == SLIDING else None for kind in self.layer_types]
        self._handles += [
            lm.register_forward_pre_hook(self._text_entry_before, with_kwargs=True, prepend=True),
            lm.register_forward_pre_hook(self._text_entry_after, with_kwargs=True),
            lm.rotary_emb.register_forward_hook(self._keep_rope, with_kwargs=True),
        ]
        for index, wrapper in enumerate(lm.layers):
            attn = getattr(wrapper.base_layer, self.decoder.attn)
            # Gemma 3 norms queries/keys per head after the head split: the norms' outputs are (B, H, N, D).
            wrapper.capture.remove()
            wrapper.capture = QKCapture(getattr(attn, self.decoder.q_norm), getattr(attn, self.decoder.k_norm))
            self._handles += [
                wrapper.register_forward_pre_hook(self._before_prefill_layer, with_kwargs=True),
                wrapper.base_layer.register_forward_pre_hook(
                    functools.partial(self._before_decode_layer, index), with_kwargs=True
                ),
            ]

    def _before_inner(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._call = {"mask": kwargs.get("attention_mask"), "types": kwargs.get("token_type_ids")}
        return super()._before_inner(module, args, kwargs)

    def _after_inner(self, module: nn.Module, args: tuple, kwargs: Any, output: Any = None) -> None:
        self._call = None
        super()._after_inner(module, args, kwargs, output)

    # ----------------------------------------------------------------- the text model's entry
    def _text_entry_before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before the reducer's entry: hand it the inner model's 2-D mask in place of HF's per-type masks."""
        self._hf_masks, self._blocks, self._rope, self._current, self._masks = None, None, {}, {}, None
        masks = kwargs.get("attention_mask")
        if not isinstance(masks, dict):
            return None
        flat = self._call["mask"] if self._call is not None else masks
        if flat is not None and not (isinstance(flat, torch.Tensor) and flat.ndim == 2):
            if self._reducer_reads_mask(kwargs):
                refuse_4d_mask()
            return None  # masks prepared by the caller, on a forward tokenprune leaves alone
        self._hf_masks = masks
        kwargs["attention_mask"] = flat
        return args, kwargs

    def _reducer_reads_mask(self, kwargs: dict) -> bool:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache in self.reducer.sessions:
            return True
        return self.reducer.runtime.enabled and (cache is None or cache.get_seq_length() == 0)

    def _text_entry_after(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """After the reducer's entry: HF's masks where it rewrote nothing, else the masks of the shorter sequence."""
        masks, fwd = self._hf_masks, self.reducer.forward_in_flight
        self._hf_masks = None
        if masks is None:
            return None
        if fwd is not None and not fwd.decode:
            types = self._call["types"] if self._call is not None else None
            if types is not None:
                self._blocks = self._hf["get_block_sequence_ids_for_mask"](types, device=fwd.state.index.device)
            self._check_scoring_windows(fwd.state)
        if fwd is None or (fwd.decode and not fwd.session.merged) or (not fwd.decode and not fwd.state.merged):
            kwargs["attention_mask"] = masks  # nothing rewritten: HF's own
        elif not fwd.decode:  # merged before the LLM: the masks HF's own builder makes for the compact sequence
            embeds, cache = kwargs["inputs_embeds"], kwargs.get("cache", kwargs.get("past_key_values"))
            kwargs["attention_mask"] = self._build(
                embeds, kwargs["attention_mask"], cache, kwargs.get("position_ids"), fwd.state
            )
        # A decode step after merging: the text model builds HF's decode masks from the compact 2-D mask.
        return args, kwargs

    def _build(self, embeds: torch.Tensor, mask: Any, cache: Any, positions: Any, state: Any) -> dict:
        """HF's per-type masks for the current tokens of ``state`` (each keeps its original image block)."""
        config = self.language_model.config
        if self._blocks is None:
            return self._hf["create_masks_for_generate"](config, embeds, mask, cache, positions)
        blocks = torch.where(state.valid, self._blocks.gather(1, state.index.clamp(min=0)), -1)  # (B, N)
        return self._hf["create_masks_for_vision_model"](config, embeds, mask, cache, positions, blocks)

    def _check_scoring_windows(self, state: Any) -> None:
        """Refuse a removal scored at a sliding layer whose window would cut a sample's scoring rows."""
        method = self.reducer.method
        if method.query_rows == "none":
            return
        for layer, kind in enumerate(self.layer_types):
            if kind != SLIDING or not scored_after(state, layer):
                continue
            longest = max(t + v for t, v in zip(state.text, state.targets_list[layer], strict=True))
            if longest > self.window:
                full = [i for i, k in enumerate(self.layer_types) if k == FULL]
                raise NotImplementedError(
                    f"{method.name} scores visual tokens at layer {layer}, a sliding-window layer "
                    f"(sliding_window={self.window}), on a prompt of {longest} tokens there: its causal scoring rows "
                    f"would read keys outside the window; score at a full-attention layer (layers {full}) or keep "
                    "prompts within the window"
                )

    def _keep_rope(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fwd = self.reducer.forward_in_flight if self.reducer is not None else None
        if fwd is not None and not fwd.decode and fwd.active:
            kind = args[2] if len(args) > 2 else kwargs["layer_type"]
            self._rope[kind] = output  # (cos, sin), each (B or 1, N, D): HF's own, for this layer type

    # ----------------------------------------------------------------- every layer
    def _before_prefill_layer(self, wrapper: nn.Module, args: tuple, kwargs: dict) -> None:
        """After an in-LLM removal: the mask and ``(cos, sin)`` of this layer's type for the reducer to pass on."""
        fwd = self.reducer.forward_in_flight
        if fwd is None or not fwd.prefill_after_removal:
            return
        state, kind = fwd.state, self.layer_types[wrapper.layer]
        key = (state.version, kind)
        if key not in self._current:
            hidden = args[0] if args else kwargs["hidden_states"]
            if self._masks is None or self._masks[0] != state.version:
                valid = None if fwd.all_valid else state.valid
                self._masks = (state.version, self._build(hidden, valid, None, None, state))
            slots = torch.searchsorted(state.index_in[0].contiguous(), state.index.contiguous())  # (B, N)
            rope = tuple(gather_seq(t, slots) for t in self._rope[kind])
            self._current[key] = (self._masks[1][kind], rope)
        fwd.mask, fwd.position_embeddings = self._current[key]
        fwd.mask_version = state.version

    def _before_decode_layer(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """A decode step on a compact layer: HF's mask of its type, sized from its own cache and key validity."""
        fwd = self.reducer.forward_in_flight if self.reducer is not None else None
        if fwd is None or not fwd.decode or not fwd.session.compact[layer]:
            return None
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        build = create_sliding_window_causal_mask if self.layer_types[layer] == SLIDING else create_causal_mask
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        valid = fwd.session.key_valid[layer]
        kwargs["attention_mask"] = build(self.language_model.config, hidden, valid, cache, None, layer_idx=layer)
        return args, kwargs


register_adapter(hf_classes("Gemma3ForConditionalGeneration"), Gemma3Adapter, Gemma3Adapter.description)

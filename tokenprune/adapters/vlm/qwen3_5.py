"""``Qwen3_5ForConditionalGeneration`` (transformers 5.x): a hybrid decoder of gated delta-net (linear-attention)
layers and a few full-attention layers, behind Qwen3-VL's vision tower without DeepStack.

The vision side (spans per temporal slice, 3-axis M-RoPE positions, decode positions, tower signals, vision FLOPs)
is Qwen2-VL's / Qwen3-VL's (:class:`~tokenprune.adapters.vlm.qwen2_vl.Qwen2VLAdapter`). What this file owns is the
hybrid language model (``config.layer_types``: ``"linear_attention"`` or ``"full_attention"`` per layer):

* **Linear-attention layers** (``linear_attn``: a causal depthwise conv and a gated delta rule, its state carried
  in the cache's ``LinearAttentionLayer``) take a 2-D padding mask: HF's ``apply_mask_to_padding_states``
  zeroes the hidden states of masked tokens before the in-projections. A zeroed token adds nothing to a zero
  recurrent state (its key, value and conv input are 0) and a zero state stays zero under any decay, so fill slots
  *left* of a sample (the reducer's right-aligned compaction) leave its conv and recurrent states as if it ran
  alone. After merging before the LLM HF builds that 2-D mask itself from the compact sequence
  (``create_recurrent_attention_mask``); after an in-LLM removal every later linear layer is given the compact
  sequence's validity (``state.valid``), so it never sees a removed token: its recurrence runs over the kept tokens
  only. The full-attention layers get the reducer's 4-D mask as in every family, and cache only kept tokens.
* **Decode**: a one-token step passes no mask to a linear layer (as HF: a generated token is never padding); a
  multi-token step passes the new tokens' validity.
* **Scoring needs a full-attention layer.** A removal is scored from the queries and keys of the layer it follows;
  a linear-attention layer has none of the softmax kind. A plan that removes tokens after a linear-attention layer
  is refused (NotImplementedError naming the full-attention layers), before the forward for fixed schedules and at
  the prefill for FLOPs budgets: the cut is not moved silently, since that would change the method's plan and cost.
* **FLOPs** of a linear layer (:class:`HybridDecoderFlops`): its projections, the depthwise conv (as HF calls it:
  ``K - 1`` zeros on both sides, ``L + K - 1`` outputs) and the matmuls of HF's chunked delta rule on the sequence
  padded to chunks of 64 (``torch.linalg.solve_triangular`` is not counted, as torch's flop counter does not).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from torch import nn

from tokenprune.adapters.base import hf_classes, linear_macs
from tokenprune.adapters.vlm.flops import DecoderFlops
from tokenprune.adapters.vlm.layer import DecoderSpec
from tokenprune.adapters.vlm.qwen2_vl import Qwen2VLAdapter
from tokenprune.registry import register_adapter

LINEAR, FULL = "linear_attention", "full_attention"
CHUNK = 64  # HF's ``torch_chunk_gated_delta_rule`` chunk size


@dataclass(frozen=True)
class HybridDecoderSpec(DecoderSpec):
    """Qwen3.5's decoder layer: ``self_attn`` (q/k-normed) in full-attention layers, ``linear_attn`` elsewhere."""

    linear_attn: str = "linear_attn"

    def missing(self, layer: nn.Module) -> list[str]:
        if hasattr(layer, self.attn):
            return super().missing(layer)
        mixer = getattr(layer, self.linear_attn, None)
        needed = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "conv1d")
        missing = [n for n in (self.linear_attn, self.mlp) if not hasattr(layer, n)]
        return missing + [f"{self.linear_attn}.{n}" for n in needed if mixer is not None and not hasattr(mixer, n)]


def chunked_delta_rule_macs(tokens: int, heads: int, key_dim: int, value_dim: int) -> int:
    """MACs of HF's chunked gated delta rule on ``tokens`` tokens (one sample; padded to chunks of 64)."""
    chunks = -(-tokens // CHUNK)
    intra = 2 * CHUNK * CHUNK * key_dim + CHUNK * CHUNK * value_dim  # k_beta @ k^T, q @ k^T, attn @ v_new
    scan = 3 * CHUNK * key_dim * value_dim  # k_cumdecay @ S, q @ S, k^T @ v_new
    return heads * chunks * (intra + scan)


class HybridDecoderFlops(DecoderFlops):
    """:class:`DecoderFlops` where ``linear_attention`` layers cost their gated delta-net, not softmax attention."""

    def __init__(self, language_model: nn.Module, spec: HybridDecoderSpec) -> None:
        super().__init__(language_model, spec)
        config = language_model.config
        self.kinds = list(config.layer_types)
        self.linear: dict[int, tuple[int, int, int, int, int, int]] = {}
        for index, layer in enumerate(language_model.layers):
            if self.kinds[index] != LINEAR:
                continue
            mixer = getattr(layer, spec.linear_attn)
            projections = sum(linear_macs(getattr(mixer, n)) for n in ("in_proj_qkv", "in_proj_z", "in_proj_a"))
            projections += linear_macs(mixer.in_proj_b) + linear_macs(mixer.out_proj)
            conv = mixer.conv1d
            heads = config.linear_num_value_heads
            self.linear[index] = (
                projections,
                conv.out_channels,
                conv.kernel_size[0],
                heads,
                config.linear_key_head_dim,
                config.linear_value_head_dim,
            )

    def layer(self, layer: int, tokens: int) -> float:
        if layer not in self.linear:
            return super().layer(layer, tokens)
        projections, channels, kernel, heads, key_dim, value_dim = self.linear[layer]
        mlp = self._macs[layer][1]
        conv = channels * kernel * (tokens + kernel - 1)
        delta = chunked_delta_rule_macs(tokens, heads, key_dim, value_dim)
        return 2.0 * (tokens * (projections + mlp) + conv + delta)


class Qwen3_5Adapter(Qwen2VLAdapter):
    """``Qwen3_5ForConditionalGeneration``: Qwen3-VL's tower, a hybrid linear/full-attention language model."""

    description = "transformers Qwen3_5ForConditionalGeneration (hybrid gated delta-net / full attention)"
    layout = "transformers 5.x Qwen3.5"
    decoder = HybridDecoderSpec()
    no_tower_merging = (
        "its vision tower is Qwen3-VL's own (no tokenprune ViT adapter) and its 2x2 patch merger folds four patches "
        "into each LLM token"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        owner = type(model).__name__
        self.layer_types: list[str] = list(self.language_model.config.layer_types)
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise NotImplementedError(f"{owner}: layer types {unknown}; tokenprune knows {[LINEAR, FULL]}")
        self.full_layers = [i for i, kind in enumerate(self.layer_types) if kind == FULL]
        self.llm_flops = HybridDecoderFlops(self.language_model, self.decoder)
        self._masks: dict[tuple[int, str], Any] = {}  # per (state version, layer kind): the mask after a removal

    # ----------------------------------------------------------------- scoring layers
    def check_scoring_layers(self, fractions: list[float] | list[list[int]], owner: str) -> None:
        """Refuse a removal after a linear-attention layer (``fractions`` per layer, or per layer per sample)."""
        for layer in range(len(fractions) - 1):
            before, after = fractions[layer], fractions[layer + 1]
            drops = (
                any(a < b for b, a in zip(before, after, strict=True)) if isinstance(before, list) else after < before
            )
            if drops and self.layer_types[layer] == LINEAR:
                raise NotImplementedError(
                    f"{owner} removes visual tokens after layer {layer} of {type(self.model).__name__}, a "
                    "linear-attention (gated delta-net) layer: it has no softmax queries and keys to score them "
                    f"from; remove after a full-attention layer (layers {self.full_layers}), e.g. fastv k=l+1 for "
                    "such a layer l"
                )

    def resolve_schedule(self, runtime: Any) -> list[float] | None:
        fractions = super().resolve_schedule(runtime)
        if fractions is not None:
            self.check_scoring_layers(fractions, runtime.method.name)
        return fractions

    # ----------------------------------------------------------------- install
    def install(self, runtime: Any) -> None:
        super().install(runtime)
        self.reducer.recurrent_layers = [kind == LINEAR for kind in self.layer_types]
        self._handles.append(self.language_model.register_forward_pre_hook(self._after_entry, with_kwargs=True))
        for index, wrapper in enumerate(self.language_model.layers):
            self._handles += [
                wrapper.register_forward_pre_hook(self._before_prefill_layer, with_kwargs=True),
                wrapper.base_layer.register_forward_pre_hook(
                    functools.partial(self._before_decode_layer, index), with_kwargs=True
                ),
            ]

    def _after_entry(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """After the reducer's entry: a FLOPs budget's per-prompt plan may not remove after a linear layer."""
        self._masks = {}
        fwd = self.reducer.forward_in_flight
        if fwd is not None and not fwd.decode and fwd.active:
            self.check_scoring_layers(fwd.state.targets_list, self.reducer.method.name)

    def _before_prefill_layer(self, wrapper: nn.Module, args: tuple, kwargs: dict) -> None:
        """After an in-LLM removal: a linear layer gets the compact sequence's 2-D validity, a full one the 4-D mask."""
        fwd = self.reducer.forward_in_flight
        if fwd is None or not fwd.prefill_after_removal:
            return
        state, kind = fwd.state, self.layer_types[wrapper.layer]
        key = (state.version, kind)
        if key not in self._masks:
            valid = None if fwd.all_valid else state.valid
            if kind == LINEAR:
                self._masks[key] = valid  # (B, N) or None, as HF's create_recurrent_attention_mask
            else:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._masks[key] = self.reducer.mask(valid, state.num_tokens, hidden)
        fwd.mask, fwd.mask_version = self._masks[key], state.version

    def _before_decode_layer(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """A decode step on a compact linear layer: the new tokens' 2-D validity (None for one token), as HF."""
        fwd = self.reducer.forward_in_flight if self.reducer is not None else None
        if fwd is None or not fwd.decode or not fwd.session.compact[layer] or self.layer_types[layer] != LINEAR:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len, valid = hidden.shape[1], fwd.session.key_valid[layer]
        new = None if q_len == 1 or valid is None else valid[:, -q_len:]
        kwargs["attention_mask"] = None if new is None or bool(new.all()) else new
        return args, kwargs


register_adapter(hf_classes("Qwen3_5ForConditionalGeneration"), Qwen3_5Adapter, Qwen3_5Adapter.description)

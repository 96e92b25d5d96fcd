"""Real removal of visual tokens inside a Hugging Face (transformers 5.x) decoder LLM: the prefill flow.

A family adapter (:mod:`tokenprune.adapters.vlm.base`) finds the visual tokens of every sample and hands them to a
:class:`DecoderReducer` (``pending_visual``), which owns everything on the language-model side:

* **Entry** (a forward pre-hook on the text model, e.g. ``LlamaModel``/``Qwen2Model``): on a prefill it plans
  each sample (:class:`~tokenprune.methods.vlm.VisualPlan`, FLOPs budgets solved per prompt), reduces visual
  spans before the LLM if the method does, and rewrites ``inputs_embeds``, ``attention_mask`` and ``position_ids``
  so HF's own mask and rotary code build the first layers' inputs for the shorter sequence. On a decode step it
  translates the caller's (full-length) mask and positions to the compact cache (:mod:`.cache`).
* **Layers** (:mod:`.layer`: each ``model.layers[i]`` wrapped, the original kept as ``base_layer`` and always the
  one that runs): a layer after which the plan has fewer visual tokens captures its queries and keys, the method
  scores the visual tokens from them (:class:`~tokenprune.methods.vlm.DecoderLayerContext`: a few query rows per
  head, the layer's attention itself stays SDPA), and the top tokens per sample are kept; hidden states,
  ``position_embeddings`` (cos, sin), ``position_ids`` and the attention mask of every later layer are sliced or
  rebuilt, so later layers compute on, and cache, only the kept tokens. The removing layer itself runs whole.
* **Recycling** (a plan with a ``recycle`` rule, e.g. SparseVLM's): :mod:`.recycling`.

Invariants:

* Rotary positions are never renumbered by in-LLM pruning: a kept token keeps the cos/sin of its original
  position, and decoding continues at the caller's positions. Reduction before the LLM may compact positions
  (AIM's default): then decode positions are shifted by the number of tokens merged away in that sample.
* Kept tokens stay in their original order; per-sample counts may differ: shorter samples are left-filled with
  masked slots (``state.valid`` False, ``state.index`` -1). Padding is dropped by the first removal and re-made
  as fill, so both left- and right-padded batches equal their samples run alone.
* Text tokens are never removed, nor are *structural* tokens (image-layout tokens a family marks, e.g.
  LLaVA-OneVision's row-end ``image_newline``): kept like text, never merged, and never query rows. A prompt
  without visual tokens runs unreduced. With nothing to remove (zero ratios), no tensor is touched: outputs are
  bit-identical to the unpatched model.
* A method that sets ``prunes_text`` (LazyLLM) may remove text tokens too: its prunable tokens
  (``state.prunable``, what the plan's counts count) are every real token but the structural ones and each
  sample's last (the one that predicts the next token), so a text-only prompt is pruned as well; ``state.visual``
  still marks the visual ones. Such a method does not merge before the LLM.
* A cache produced by a reduced prefill is remembered (weakly, per ``Cache`` object): every later forward with
  it, even inside ``tokenprune.disabled``, gets the per-layer masks its compact layers need.

Supported: ``sdpa`` and ``eager`` attention, ``DynamicCache`` of full-attention layers (or no cache). Outputs are
shorter once tokens are removed: ``logits`` has one row per kept token (``patch.state.index`` maps rows to input
positions; the last row stays the last prompt token, so ``generate()`` is unaffected). Only a prefill (empty or
no cache) is reduced: later forwards on the cache, e.g. a second turn, run on it unreduced.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.vlm.cache import check_cache, decode_step
from tokenprune.adapters.vlm.decode_selection import eligible_tokens, follow_reorder, open_selection
from tokenprune.adapters.vlm.flops import DecoderFlops, pruning_extra
from tokenprune.adapters.vlm.layer import DecoderSpec, ReducingDecoderLayer
from tokenprune.adapters.vlm.masks import build_mask, check_decoder_attention, refuse_4d_mask
from tokenprune.adapters.vlm.recycling import recycle_pruned
from tokenprune.adapters.vlm.state import CacheSession, DecoderState, ForwardInFlight, VisualInputs
from tokenprune.core.sequence import compact, gather_positions, gather_seq, segment_positions, top_per_row
from tokenprune.methods.vlm import (
    DecoderLayerContext,
    LLMInputs,
    PreLLMContext,
    TowerSignals,
    VisualPlan,
    VisualTokenMethod,
)
from tokenprune.state import LayerLog


def prunable_tokens(
    valid: torch.Tensor, visual: torch.Tensor, structural: torch.Tensor, prunes_text: bool
) -> torch.Tensor:
    """``(B, L)`` the tokens a method may remove: the ``visual`` ones, or (``prunes_text``) every ``valid`` token
    but the ``structural`` ones and each sample's last (it predicts the next token)."""
    if not prunes_text:
        return visual
    positions = torch.arange(valid.shape[1], device=valid.device)
    last = torch.where(valid, positions, -1).amax(dim=1, keepdim=True)  # (B, 1)
    return valid & ~structural & (positions[None, :] != last)


class DecoderReducer:
    """Removes visual tokens inside one text model (``LlamaModel``, ``Qwen2Model``, ...) for one patch.

    Args:
        language_model: The text model: has ``layers``, ``config``, ``embed_tokens`` and is called as
            ``language_model(inputs_embeds=..., attention_mask=..., position_ids=..., cache=...)``.
        runtime: The patch's runtime (``method``, ``config``, ``enabled``, ``state``).
        owner: Model class name for error messages.
        spec: Names inside a decoder layer.
        flops: The text model's per-layer FLOPs (FLOPs budgets are solved with them); default: computed here.
        rope: ``apply_rotary_pos_emb(q, k, cos, sin)``; default: the one in the layers' modeling module.
    """

    def __init__(
        self,
        language_model: nn.Module,
        runtime: Any,
        owner: str,
        spec: DecoderSpec | None = None,
        flops: DecoderFlops | None = None,
        rope: Callable | None = None,
    ) -> None:
        self.lm = language_model
        self.runtime = runtime
        self.owner = owner
        self.spec = spec or DecoderSpec()
        self.layers = language_model.layers
        # The first layer with softmax attention (hybrid decoders, e.g. Qwen3.5, begin with linear-attention layers).
        attn = next((getattr(x, self.spec.attn) for x in self.layers if hasattr(x, self.spec.attn)), None)
        if attn is None:
            raise TypeError(f"{owner}'s language model has no layer with {self.spec.attn!r}: nothing to score from")
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        if rope is None:
            rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise TypeError(f"{type(attn).__name__} has no apply_rotary_pos_emb in its module; pass rope=")
        self.rope = rope
        self.flops = flops or DecoderFlops(language_model, self.spec)
        self.forward_in_flight: ForwardInFlight | None = None
        #: Set by the family adapter before the text model runs (its inner model's pre-hook).
        self.pending_visual: VisualInputs | None = None
        self.sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        #: Per layer, the sliding window of a family whose adapter builds sliding-window masks itself (Gemma 3);
        #: None: the cache must hold full-attention layers only (:func:`~.cache.check_cache`).
        self.sliding_windows: list[int | None] | None = None
        #: Per layer, whether it is a linear-attention (recurrent) layer whose adapter masks it itself (Qwen3.5);
        #: None: none is (:func:`~.cache.check_cache`).
        self.recurrent_layers: list[bool] | None = None
        self._plans: dict[tuple, VisualPlan] = {}
        self._originals: list[nn.Module] = []
        self._handles: list[Any] = []

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def method(self) -> VisualTokenMethod:
        return self.runtime.method

    @property
    def prunes_text(self) -> bool:
        """Whether the method prunes text tokens too (its ``prunes_text``, e.g. LazyLLM's), not visual ones only."""
        return bool(self.method.prunes_text)

    # ------------------------------------------------------------------------- install / uninstall
    def install(self) -> None:
        self._originals = list(self.layers)
        for index, layer in enumerate(self._originals):
            self.layers[index] = ReducingDecoderLayer(layer, index, self)
        self._handles = [
            self.lm.register_forward_pre_hook(self._entry, with_kwargs=True),
            self.lm.register_forward_hook(self._exit, always_call=True),
        ]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        for index, original in enumerate(self._originals):
            wrapper = self.layers[index]
            if isinstance(wrapper, ReducingDecoderLayer):
                wrapper.remove_hooks()
            self.layers[index] = original
        self._originals, self._handles = [], []
        self.forward_in_flight = self.pending_visual = None

    # ------------------------------------------------------------------------- planning
    def plan(self, spans: list[int], text: int, rows: int) -> VisualPlan:
        """The plan of one sample with visual ``spans`` (tokens per image), ``text`` tokens, scoring ``rows``."""
        key = (tuple(spans), text, rows)
        if key not in self._plans:
            method, depth = self.method, self.depth
            budget = getattr(self.runtime.config, "flops", None)
            if not sum(spans):  # no visual token: nothing to plan, the prompt runs unreduced
                plan = VisualPlan.identity(depth)
            elif budget is None:
                plan = method.plan_for(depth)
            else:

                def cost(candidate: VisualPlan) -> float:
                    merged = sum(method.merged_count(n, candidate.merge_keep) for n in spans)
                    visual = candidate.visual_counts(merged)
                    recycled = candidate.recycled_counts(merged)
                    extra = pruning_extra(method, visual, recycled, rows, self.flops.hidden_size)
                    return self.flops.prefill(text, visual, rows, extra)

                plan = method.solve_budget(budget, depth, sum(spans), cost)
            self._plans[key] = plan
        return self._plans[key]

    def mask(self, key_valid: torch.Tensor | None, keys: int, hidden_states: torch.Tensor) -> Any:
        implementation = self.lm.config._attn_implementation
        q_len, dtype, device = hidden_states.shape[1], hidden_states.dtype, hidden_states.device
        return build_mask(key_valid, keys, q_len, implementation, dtype, device)

    # ------------------------------------------------------------------------- entry / exit hooks
    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.forward_in_flight = None

    def _entry(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.forward_in_flight = None
        pending, self.pending_visual = self.pending_visual, None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        session = self.sessions.get(cache) if cache is not None else None
        past = cache.get_seq_length() if cache is not None else 0
        if session is not None and past == 0:  # the cache was reset: its old bookkeeping is void
            del self.sessions[cache]
            session = None
        if args and (session is not None or self.runtime.enabled):
            raise TypeError(
                f"tokenprune: call {type(module).__name__} with keyword arguments (inputs_embeds=..., "
                "attention_mask=...), or run that call inside tokenprune.disabled(model)"
            )
        if session is not None:
            kwargs = decode_step(kwargs, session)
            self.forward_in_flight = ForwardInFlight(decode=True, session=session)
            return (), kwargs
        if not self.runtime.enabled or past > 0:
            return None  # unreduced, or a cache this patch did not fill: leave everything to HF
        check_decoder_attention(self.lm.config, self.owner)
        return self._enter_prefill(kwargs, pending)

    def _embeds(self, kwargs: dict) -> torch.Tensor:
        if kwargs.get("inputs_embeds") is not None:
            return kwargs["inputs_embeds"]
        embeds = self.lm.embed_tokens(kwargs["input_ids"])
        kwargs["input_ids"], kwargs["inputs_embeds"] = None, embeds
        return embeds

    def _enter_prefill(self, kwargs: dict, pending: VisualInputs | None) -> tuple[tuple, dict]:
        x = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        batch, length = x.shape[:2]
        device = x.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            mask = None if pending is None and not self.prunes_text else refuse_4d_mask()
        valid = (
            mask[:, -length:].bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        structural = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if pending is not None:
            visual = pending.visual.to(device) & valid
            segments = torch.where(visual, pending.segments.to(device), -1)
            if pending.structural is not None:
                structural = pending.structural.to(device) & valid & ~visual
        else:
            visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
            segments = torch.full((batch, length), -1, dtype=torch.long, device=device)
        prunable = prunable_tokens(valid, visual, structural, self.prunes_text)

        # Plan every sample: prunable tokens (per image, or all of them for a method that prunes text), the other
        # tokens, scoring rows.
        spans_per_sample = segment_positions(segments)
        text = (valid & ~prunable).sum(dim=1).tolist()
        after = (visual.long().cumsum(dim=1) > 0) & valid & ~visual & ~structural
        rows = {"text": after.sum(dim=1).tolist(), "last": [1] * batch, "none": [0] * batch}[self.method.query_rows]
        if self.prunes_text:
            counts = [[n] for n in prunable.sum(dim=1).tolist()]
        else:
            counts = [[len(p) for _, p in spans] for spans in spans_per_sample]
        plans = [self.plan(c, t, r) for c, t, r in zip(counts, text, rows, strict=True)]
        merge = any(p.merge_keep < 1.0 for p, spans in zip(plans, spans_per_sample, strict=True) if spans)
        if merge and self.prunes_text:
            raise NotImplementedError(
                f"tokenprune: method {self.method.name!r} prunes text tokens; merging visual spans before the LLM "
                "is supported for methods that prune visual tokens only (give it merge_keep=1.0)"
            )

        eligible = eligible_tokens(self.method, spans_per_sample, batch, length, device)  # (B, L) or None
        index = torch.arange(length, device=device).expand(batch, length)
        size = valid.to(x.dtype)
        fwd = ForwardInFlight(decode=False, external_length=(mask.shape[1] if mask is not None else length))
        fwd.shift = torch.zeros(batch, dtype=torch.long, device=device)
        tower = None
        if merge:
            x = self._embeds(kwargs)
            tower = pending.tower() if pending is not None and pending.tower is not None else None
            if tower is None and self.method.tower_layer is not None:
                raise RuntimeError(
                    f"tokenprune: method {self.method.name!r} reads vision-tower signals, but the tower's run on "
                    "these images was not seen (features passed in precomputed?); pass pixel_values"
                )
            x, index, valid, visual, size, structural, kwargs = self._merge(
                x, kwargs, valid, visual, structural, spans_per_sample, plans, fwd, tower
            )
        if not self.prunes_text:
            prunable = visual  # after merging: the merged visual tokens
        merged_counts = prunable.sum(dim=1).tolist()
        per_sample = [p.visual_counts(m) for p, m in zip(plans, merged_counts, strict=True)]
        targets_list = [[counts[layer] for counts in per_sample] for layer in range(self.depth)]
        targets = torch.tensor(targets_list, dtype=torch.long, device=device).reshape(self.depth, batch)
        fwd.state = DecoderState(
            index, valid, visual, size, length, plans, targets, targets_list, merged=merge, structural=structural
        )
        fwd.state.prunable = prunable
        fwd.state.spans = [[len(p) for _, p in spans] for spans in spans_per_sample]
        if any(p.recycle is not None for p in plans):  # recycled tokens the removal before each layer makes
            made = [p.recycled_counts(m) for p, m in zip(plans, merged_counts, strict=True)]
            fwd.state.recycled_list = [[counts[layer] for counts in made] for layer in range(self.depth)]
            fwd.state.recycled = torch.tensor(fwd.state.recycled_list, dtype=torch.long, device=device)
        if fwd.source is None:  # nothing merged before the LLM: every input token stands for itself
            fwd.source = torch.arange(length, device=device).expand(batch, length)
        fwd.state.source = fwd.source
        fwd.state.tower_flops = tower.flops if tower is not None else [0.0] * batch
        fwd.state.text, fwd.state.rows = text, rows
        fwd.all_valid = bool(valid.all())
        prunes_inside = any(self._prunes(fwd.state, layer) for layer in range(self.depth))
        if eligible is not None:  # in the slots entering the LLM (after merging)
            fwd.decode_kv = open_selection(self.method, eligible.gather(1, index.clamp(min=0)) & valid, prunes_inside)
        fwd.active = merge or eligible is not None or prunes_inside
        self.runtime.state = fwd.state
        self.forward_in_flight = fwd
        return (), kwargs

    def _merge(self, x, kwargs, valid, visual, structural, spans_per_sample, plans, fwd, tower):
        """Reduce visual spans before the LLM; returns the compacted sequence and the rewritten kwargs."""
        batch, length, _ = x.shape
        device = x.device
        keep = valid & ~visual
        text = None
        if self.method.reads_text:  # the instruction: text after the first visual token, layout tokens excluded
            after_image = visual.long().cumsum(dim=1) > 0
            text_rows, text_valid = compact(valid & ~visual & ~structural & after_image)  # (B, T)
            text = (x.gather(1, text_rows[..., None].expand(-1, -1, x.shape[-1])), text_valid)
        x = x.clone()
        size = valid.to(x.dtype)
        # Input position of the token that stands for each input position (-1: merged or dropped away unkept).
        source = torch.arange(length, device=device).expand(batch, length).clone()
        groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
        for b, (spans, plan) in enumerate(zip(spans_per_sample, plans, strict=True)):
            for _, span_positions in spans:
                n = len(span_positions)
                groups.setdefault((n, self.method.merged_count(n, plan.merge_keep)), []).append((b, span_positions))
        for (n, target), members in groups.items():
            rows = torch.tensor([b for b, _ in members], device=device)
            positions = torch.tensor([p for _, p in members], device=device)  # (S, n), ascending per span
            if target >= n:
                keep[rows[:, None], positions] = True
                continue
            signals = None
            if tower is not None:
                signals = TowerSignals(
                    tower.layer,
                    tower.attention.to(device)[rows[:, None], positions],  # (S, n)
                    tower.keys.to(device)[rows[:, None], positions],  # (S, n, D)
                    tower.from_class_token,
                    None if tower.groups is None else tower.groups.to(device)[rows[:, None], positions],  # (S, n)
                )
            context = PreLLMContext(x[rows[:, None], positions], target, signals)
            if text is not None:
                context.text, context.text_valid = text[0][rows], text[1][rows]
            reduction = self.method.merge(context)
            local, merged, held = reduction.index, reduction.embeds, reduction.size  # (S, K), (S, K, C), (S, K)
            stored = positions.gather(1, local)
            group = reduction.groups(n)  # (S, n) kept token standing for each span token, -1: none
            source[rows[:, None], positions] = torch.where(group >= 0, stored.gather(1, group.clamp(min=0)), -1)
            x[rows[:, None], stored] = merged.to(x.dtype)
            size[rows[:, None], stored] = held.to(x.dtype)
            keep[rows[:, None], stored] = True
        removed = valid & ~keep  # merged away (padding is dropped too, but never counted)
        gather, slot_valid = compact(keep)
        external = kwargs.get("position_ids")
        if external is None:
            external = torch.arange(length, device=device).expand(batch, length)
        external = external.expand(batch, length) if external.ndim == 2 else external
        compact_positions = getattr(self.runtime.config, "merge_positions", "original") == "compact"
        if external.ndim != 2 and compact_positions:  # multi-axis (M-RoPE) positions: each token keeps its own
            raise NotImplementedError(
                "tokenprune: merge_positions='compact' supports 1D (per-sample) position ids only; "
                "use merge_positions='original'"
            )
        positions = external
        if compact_positions:
            positions = external - removed.long().cumsum(dim=1)
            fwd.shift = removed.sum(dim=1)
        new_positions = torch.where(slot_valid, gather_positions(positions, gather), 0)
        index = torch.where(slot_valid, gather, -1)
        x = x.gather(1, gather[..., None].expand(-1, -1, x.shape[-1]))
        visual = visual.gather(1, gather) & slot_valid
        structural = structural.gather(1, gather) & slot_valid
        size = torch.where(slot_valid, size.gather(1, gather), 0)
        mask = kwargs.get("attention_mask")
        kwargs["inputs_embeds"] = x
        kwargs["attention_mask"] = slot_valid.to(mask.dtype if mask is not None else torch.long)
        kwargs["position_ids"] = new_positions
        fwd.source = source
        return x, index, slot_valid, visual, size, structural, kwargs

    # ------------------------------------------------------------------------- one prefill layer
    def _prunes(self, state: DecoderState, layer: int) -> bool:
        """Whether visual tokens are removed after ``layer`` (decided on the host from the plans)."""
        if layer + 1 >= self.depth:
            return False
        pairs = zip(state.targets_list[layer], state.targets_list[layer + 1], strict=True)
        return any(after < before for before, after in pairs)

    def _open_session(self, fwd: ForwardInFlight, layer: int, cache: Any) -> None:
        """Record what this layer leaves in the cache (a session is opened at layer 0)."""
        state = fwd.state
        if layer == 0:
            check_cache(cache, self.sliding_windows, self.recurrent_layers)
            depth = self.depth
            fwd.session = CacheSession(
                [None] * depth, [0] * depth, [False] * depth, state.merged, fwd.shift, fwd.external_length, state
            )
            self.sessions[cache] = fwd.session
            if fwd.decode_kv is not None:
                fwd.session.decode_kv = fwd.decode_kv
                follow_reorder(cache, fwd.session)
        if fwd.session is not None:
            fwd.session.key_valid[layer] = None if fwd.all_valid else state.valid
            fwd.session.key_length[layer] = state.num_tokens
            fwd.session.compact[layer] = state.version > 0

    def run_prefill_layer(
        self, wrapper: ReducingDecoderLayer, hidden_states: torch.Tensor, attention_mask: Any, kwargs: dict
    ) -> torch.Tensor:
        fwd, layer = self.forward_in_flight, wrapper.layer
        state = fwd.state
        if state.version > 0:  # the sequence changed after HF built the mask and cos/sin: use ours
            if fwd.mask_version != state.version:
                key_valid = None if fwd.all_valid else state.valid
                fwd.mask, fwd.mask_version = self.mask(key_valid, state.num_tokens, hidden_states), state.version
            attention_mask = fwd.mask
            kwargs["position_embeddings"] = fwd.position_embeddings
            if isinstance(kwargs.get("position_ids"), torch.Tensor):
                kwargs["position_ids"] = fwd.position_ids
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if fwd.active and cache is not None and kwargs.get("use_cache", True) is not False:
            self._open_session(fwd, layer, cache)
        tokens_in = hidden_states.shape[1]
        if layer == 0 and fwd.active and self.method.reads_inputs:
            fwd.inputs = LLMInputs(hidden_states, state.index, state.valid, state.visual, state.structural)
        state.visual_in.append(state.visual.sum(dim=1))
        state.prunable_in.append(state.prunable.sum(dim=1))
        state.index_in.append(state.index)
        if not self._prunes(state, layer):
            out = wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
            state.log.append(LayerLog(layer, tokens_in, tokens_in))
            state.scored_rows.append(0)
            return out
        capture = wrapper.capture
        if capture is None:  # the family's adapter refuses such plans first; this guards any other path
            raise NotImplementedError(
                f"tokenprune: {self.owner} layer {layer} has no softmax attention ({self.spec.attn!r}) to score "
                "visual tokens from; remove them after a layer that has one"
            )
        capture.active = True
        try:
            out = wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        finally:
            capture.active = False
        queries, keys = capture.pop()  # (B, H, N, D), (B, Hkv, N, D)
        position_embeddings = kwargs["position_embeddings"]
        ctx = DecoderLayerContext(
            layer,
            queries,
            keys,
            position_embeddings,
            state.valid,
            state.visual,
            self.rope,
            self.scale,
            structural=state.structural,
            hidden=out[0] if isinstance(out, tuple) else out,
            keep=state.targets[layer + 1],
            index=state.index,
            inputs=fwd.inputs,
        )
        scores = self.method.importance(ctx).float()  # (B, N)
        selected, recycled = state.targets[layer + 1], None
        if state.recycled_list is not None and any(state.recycled_list[layer + 1]):
            recycled = state.recycled[layer + 1]  # (B,) the plan's count holds these recycled tokens
            selected = selected - recycled
        keep = (state.valid & ~state.prunable) | top_per_row(scores, state.prunable, selected)
        hidden = ctx.hidden
        if recycled is not None:
            hidden, keep = recycle_pruned(self.method, state, ctx, scores, keep, recycled)
        gather, slot_valid = compact(keep)
        hidden = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
        state.index = torch.where(slot_valid, state.index.gather(1, gather), -1)
        prunable = state.prunable is not state.visual
        state.visual = state.visual.gather(1, gather) & slot_valid
        state.prunable = state.prunable.gather(1, gather) & slot_valid if prunable else state.visual
        state.structural = state.structural.gather(1, gather) & slot_valid
        state.size = torch.where(slot_valid, state.size.gather(1, gather), 0)
        state.valid = slot_valid
        state.version += 1
        fwd.all_valid = bool(slot_valid.all())
        fwd.position_embeddings = tuple(gather_seq(t, gather) for t in position_embeddings)
        positions = kwargs.get("position_ids")
        fwd.position_ids = gather_positions(positions, gather) if isinstance(positions, torch.Tensor) else None
        state.log.append(LayerLog(layer, tokens_in, hidden.shape[1]))
        state.scored_rows.append(ctx.scored_rows)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

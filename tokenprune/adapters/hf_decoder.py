"""Real removal of visual tokens inside a Hugging Face (transformers 5.x) decoder LLM, shared by VLM adapters.

A VLM adapter (``hf_llava``, later Qwen2-VL, ...) finds the visual tokens of every sample and hands them to a
:class:`DecoderReducer`, which owns everything on the language-model side:

* **Entry** (a forward pre-hook on the text model, e.g. ``LlamaModel``/``Qwen2Model``): on a prefill it plans
  each sample (:class:`~tokenprune.methods.vlm_configs.VisualPlan`, FLOPs budgets solved per prompt), merges
  visual spans if the method merges, and rewrites ``inputs_embeds``, ``attention_mask`` and ``position_ids`` so
  HF's own mask and rotary code build the first layers' inputs for the shorter sequence. On a decode step it
  translates the caller's (full-length) ``attention_mask`` and positions to the compact cache.
* **Layers** (each ``model.layers[i]`` wrapped, the original kept as ``base_layer`` and always the one that
  runs): a layer after which the plan has fewer visual tokens captures its ``q_proj``/``k_proj`` outputs by
  forward hooks, applies the model's own ``apply_rotary_pos_emb`` to the few query rows the method asks for
  and to the keys, and lets the method score the visual tokens (``(T x D) @ (D x N)`` per head: the layer's
  attention itself stays SDPA). The top tokens per sample are kept; hidden states, ``position_embeddings``
  (cos, sin), ``position_ids`` and the attention mask of every later layer are sliced/rebuilt, so later layers
  compute on, and cache, only the kept tokens. The removing layer itself runs whole (its cache keeps every
  token): removal acts on its output, FastV's "after layer K".

Invariants:

* Rotary positions are never renumbered by in-LLM pruning: a kept token keeps the cos/sin of its original
  position, and decoding continues at the caller's positions (``generate()``'s ``position_ids``). Merging
  before the LLM may compact positions (AIM's default): then decode positions are shifted by the number of
  tokens merged away in that sample.
* Kept tokens stay in their original order; per-sample counts may differ (different images per sample):
  shorter samples are left-filled with masked slots (``state.valid`` False, ``state.index`` -1). Padding is
  dropped by the first removal (it is masked anyway) and re-made as fill, so both left- and right-padded
  batches equal their samples run alone.
* Text tokens are never removed, nor are *structural* tokens: image-layout tokens an adapter marks (e.g.
  LLaVA-OneVision's ``image_newline`` at each row end) are kept like text and never merged, but unlike text
  they are not query rows of a method's importance (they are not the prompt). With nothing to remove (zero
  ratios), no tensor is touched: outputs are bit-identical to the unpatched model.
* A cache produced by a reduced prefill is remembered (weakly, per ``Cache`` object): every later forward with
  it, even inside ``tokenprune.disabled``, gets the per-layer masks its compact layers need.

Supported: ``sdpa`` and ``eager`` attention (masks are built as HF builds them: boolean for SDPA, additive
float for eager), ``DynamicCache`` of full-attention layers (or no cache). Sliding-window layers, static or
quantized caches and other attention implementations raise. Outputs are shorter once tokens are removed:
``logits`` has one row per kept token (``patch.state.index`` maps rows to input positions; the last row stays
the last prompt token of left-padded or unpadded prompts, so ``generate()`` is unaffected); ``labels`` are
refused while reducing. Only a prefill (empty or no cache) is reduced: later forwards on the cache, e.g. a
second turn, run on it unreduced.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import check_attn_implementation, linear_macs
from tokenprune.methods.vlm_configs import VisualPlan, VisualTokenMethod
from tokenprune.state import LayerLog


def check_decoder_attention(config: Any, owner: str) -> None:
    """Raise unless the language model runs attention as ``sdpa`` or ``eager``."""
    check_attn_implementation(
        config, owner, "inside the language model (it rebuilds their masks for the shorter sequence)"
    )


# ----------------------------------------------------------------------------- tensor helpers
def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned gather plan for the ``True`` entries of ``keep`` ``(B, N)``, order preserved.

    Returns:
        ``(gather, slot_valid)``, both ``(B, N')`` with ``N' = max(keep.sum(1))``: positions to gather and
        whether a slot holds a kept token (left fill slots point at some kept token and are False).
    """
    counts = keep.sum(dim=1)  # (B,)
    n_new = int(counts.max()) if keep.numel() else 0
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)  # kept positions first, ascending
    source = torch.arange(n_new, device=keep.device)[None, :] - (n_new - counts)[:, None]  # (B, N')
    slot_valid = source >= 0
    gather = order.gather(1, source.clamp(min=0))
    return gather, slot_valid


def gather_seq(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence dim of ``t`` ``(..., B or 1, N, D)`` with ``index`` ``(B, T)``: ``(..., B, T, D)``."""
    batch, length = index.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, batch, t.shape[-2], t.shape[-1])
    return t.gather(-2, index[..., None].expand(*lead, batch, length, t.shape[-1]))


def gather_positions(p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather position ids ``(..., B or 1, N)`` with ``index`` ``(B, T)``: ``(..., B, T)``."""
    lead = p.shape[:-2]
    p = p.expand(*lead, index.shape[0], p.shape[-1])
    return p.gather(-1, index.expand(*lead, *index.shape))


def build_mask(
    key_valid: torch.Tensor | None,
    keys: int,
    q_len: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Causal mask for the last ``q_len`` of ``keys`` keys whose validity is ``key_valid`` ``(B, K)``.

    ``key_valid`` None means every key is valid (no host sync needed to know it). Boolean for SDPA, additive
    float for eager, ``(B or 1, 1, q_len, K)``; None where HF would pass none (every key valid, and a single
    query or a full causal square that SDPA's ``is_causal`` covers).
    """
    if key_valid is None and (q_len == 1 or (implementation == "sdpa" and q_len == keys)):
        return None
    query_pos = keys - q_len + torch.arange(q_len, device=device)
    mask = (torch.arange(keys, device=device)[None, :] <= query_pos[:, None])[None, None]  # (1, 1, Q, K)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]  # (B, 1, Q, K)
    if implementation == "eager":
        mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


# ----------------------------------------------------------------------------- what a pruning layer exposes
@dataclass
class DecoderLayerContext:
    """One pruning layer's view for a :class:`VisualTokenMethod`. Shapes: ``B`` samples, ``N`` current tokens.

    Attributes:
        layer: Layer index.
        queries: ``(B, N, H * D)`` output of ``q_proj`` (before rotary embedding).
        keys: ``(B, N, Hkv * D)`` output of ``k_proj`` (before rotary embedding).
        position_embeddings: The ``(cos, sin)`` the layer used.
        valid: ``(B, N)`` real tokens (False: padding / fill).
        visual: ``(B, N)`` visual tokens.
        rope: The model's ``apply_rotary_pos_emb(q, k, cos, sin)``.
        scale: Softmax scale of the attention.
        num_heads: Query heads ``H``.
        num_kv_heads: Key/value heads ``Hkv`` (grouped-query attention when smaller).
        head_dim: ``D``.
        scored_rows: Query rows :meth:`attention_rows` scored (for FLOPs bookkeeping).
    """

    layer: int
    queries: torch.Tensor
    keys: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    valid: torch.Tensor
    visual: torch.Tensor
    rope: Callable
    scale: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scored_rows: int = field(default=0)
    structural: torch.Tensor | None = None  # (B, N) layout tokens: kept, never query rows

    def last_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, row_valid)`` ``(B, 1)``: the last real token of every sample (the one that decodes next)."""
        positions = torch.arange(self.valid.shape[1], device=self.valid.device)
        rows = torch.where(self.valid, positions, -1).amax(dim=1, keepdim=True).clamp(min=0)
        return rows, self.valid.any(dim=1, keepdim=True)

    def text_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, row_valid)`` ``(B, T)``: real text tokens after a sample's first visual token."""
        after_image = self.visual.long().cumsum(dim=1) > 0
        text = self.valid & ~self.visual & after_image
        return compact(text if self.structural is None else text & ~self.structural)

    def attention_rows(self, rows: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the query ``rows`` ``(B, T)`` over all current tokens, head-averaged.

        The layer's causal, padding-aware softmax, recomputed for these rows only in float32 from its own
        (rotary-embedded) queries and keys. Rows with ``row_valid`` False are zero.

        Returns:
            ``(B, T, N)``.
        """
        batch, n = self.valid.shape
        t, heads, kv_heads, dim = rows.shape[1], self.num_heads, self.num_kv_heads, self.head_dim
        self.scored_rows = max(self.scored_rows, t)
        cos, sin = self.position_embeddings
        q = self.queries.view(batch, n, heads, dim)
        q = q.gather(1, rows[:, :, None, None].expand(batch, t, heads, dim)).transpose(1, 2)  # (B, H, T, D)
        q = self.rope(q, q, gather_seq(cos, rows), gather_seq(sin, rows))[0]
        k = self.keys.view(batch, n, kv_heads, dim).transpose(1, 2)  # (B, Hkv, N, D)
        k = self.rope(k, k, cos, sin)[0]
        q = q.float().view(batch, kv_heads, heads // kv_heads, t, dim)
        k = k.float().transpose(-1, -2)  # (B, Hkv, D, N)
        positions = torch.arange(n, device=rows.device)
        allowed = self.valid[:, None, :] & (positions[None, None, :] <= rows[:, :, None])  # (B, T, N)
        probs = torch.zeros(batch, t, n, device=rows.device)
        for group in range(kv_heads):  # one key/value head at a time bounds memory to (B, G, T, N)
            logits = (q[:, group] @ k[:, group, None]) * self.scale  # (B, G, T, N)
            probs += logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).sum(dim=1)
        probs /= heads
        return torch.where((row_valid & allowed.any(dim=-1))[..., None], probs, torch.zeros((), device=rows.device))


# ----------------------------------------------------------------------------- per-forward / per-cache state
@dataclass
class DecoderState:
    """Bookkeeping of one reduced prefill (``patch.state`` of a VLM patch). ``B`` samples.

    Attributes:
        index: ``(B, N)`` position in the LLM input (before merging) of each current token; -1 for fill.
        valid: ``(B, N)`` real tokens.
        visual: ``(B, N)`` visual tokens.
        size: ``(B, N)`` input tokens each current token holds (merging), 0 for fill.
        structural: ``(B, N)`` image-layout tokens (kept like text, never query rows).
        num_original: Sequence length entering the LLM.
        plans: One :class:`VisualPlan` per sample.
        targets: ``(depth, B)`` visual tokens planned to enter each layer (also as nested lists, ``targets_list``).
        log: One :class:`LayerLog` per layer (sequence lengths, fill included).
        visual_in: Per layer, ``(B,)`` visual tokens that entered it.
        index_in: Per layer, the ``index`` of the tokens that entered it.
        scored_rows: Per layer, query rows scored there (0: no pruning).
        spans: Per sample, visual tokens of each span (an image, or a part of one the adapter merges on its own;
            before merging).
        text: Per sample, real text tokens.
        rows: Per sample, query rows its importance reads at a pruning layer.
        generated: Tokens decoded on top of this prefill's cache so far.
    """

    index: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    size: torch.Tensor
    num_original: int
    plans: list[VisualPlan]
    targets: torch.Tensor
    targets_list: list[list[int]]
    log: list[LayerLog] = field(default_factory=list)
    visual_in: list[torch.Tensor] = field(default_factory=list)
    index_in: list[torch.Tensor] = field(default_factory=list)
    scored_rows: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    generated: int = 0
    merged: bool = False
    structural: torch.Tensor | None = None
    version: int = 0  # removals inside the LLM so far in this forward

    @property
    def num_tokens(self) -> int:
        """Current sequence length (fill slots included)."""
        return self.index.shape[1]

    @property
    def reduced(self) -> bool:
        """True once any token was merged before, or removed inside, the LLM."""
        return self.merged or self.version > 0

    def tokens_per_layer(self) -> list[tuple[int, int]]:
        """``(tokens_in, tokens_out)`` per layer (batch sequence lengths)."""
        return [(entry.tokens_in, entry.tokens_out) for entry in self.log]

    def visual_per_layer(self) -> list[list[int]]:
        """Per layer, the visual tokens of each sample that entered it."""
        return [v.tolist() for v in self.visual_in]


@dataclass
class CacheSession:
    """What a compact KV cache needs at every later forward.

    Attributes:
        key_valid: Per layer, ``(B, K_l)`` validity of the cached keys (and, during a forward, the new ones);
            None while every one is valid.
        key_length: Per layer, ``K_l``.
        compact: Per layer, whether its cache differs from layer 0's (it needs its own mask).
        merged: Whether layer 0's cache differs from the caller's sequence (merging before the LLM).
        shift: ``(B,)`` positions merged away per sample (subtracted from the caller's decode positions).
        external_length: Tokens the caller has fed so far (its view of the sequence length).
        state: The prefill's :class:`DecoderState`.
    """

    key_valid: list[torch.Tensor | None]
    key_length: list[int]
    compact: list[bool]
    merged: bool
    shift: torch.Tensor
    external_length: int
    state: DecoderState


@dataclass
class _Forward:
    """The forward in flight (set by the entry hook, read by the layer wrappers)."""

    decode: bool
    active: bool = False  # something is merged or removed (else HF runs untouched and we only log)
    state: DecoderState | None = None
    session: CacheSession | None = None
    external_length: int = 0
    shift: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    mask: Any = None
    mask_version: int = -1
    all_valid: bool = True  # every current token is real (no padding / fill)


# ----------------------------------------------------------------------------- the layer wrapper
class _Capture:
    """Forward hooks keeping ``q_proj``/``k_proj`` outputs while :attr:`active`."""

    def __init__(self, q_module: nn.Module, k_module: nn.Module) -> None:
        self.active = False
        self.captured: dict[str, torch.Tensor] = {}
        self.handles = [
            q_module.register_forward_hook(self._hook("q")),
            k_module.register_forward_hook(self._hook("k")),
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.active:
                self.captured[name] = output

        return hook

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        captured, self.captured = self.captured, {}
        return captured["q"], captured["k"]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class ReducingDecoderLayer(nn.Module):
    """Wraps one decoder layer; after it runs, removes the visual tokens the plan drops at the next layer."""

    def __init__(self, base_layer: nn.Module, layer: int, reducer: DecoderReducer) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.__dict__["reducer"] = reducer  # plain attribute: shared, not a submodule
        attn = getattr(base_layer, reducer.spec.attn)
        self.capture = _Capture(getattr(attn, reducer.spec.q_proj), getattr(attn, reducer.spec.k_proj))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        fwd = self.reducer.forward_in_flight
        if fwd is None:
            return self.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        if fwd.decode:
            session = fwd.session
            if session.compact[self.layer]:
                layer = self.layer
                attention_mask = self.reducer.mask(session.key_valid[layer], session.key_length[layer], hidden_states)
            return self.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        return self.reducer.run_prefill_layer(self, hidden_states, attention_mask, kwargs)

    def remove_hooks(self) -> None:
        self.capture.remove()


# ----------------------------------------------------------------------------- the controller
@dataclass(frozen=True)
class DecoderSpec:
    """Names inside a decoder layer (Llama/Qwen2/Mistral layout by default)."""

    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    mlp: str = "mlp"


class DecoderReducer:
    """Removes visual tokens inside one text model (``LlamaModel``, ``Qwen2Model``, ...) for one patch.

    Args:
        language_model: The text model: has ``layers``, ``config``, ``embed_tokens`` and is called as
            ``language_model(inputs_embeds=..., attention_mask=..., position_ids=..., cache=...)``.
        runtime: The patch's runtime (``method``, ``config``, ``enabled``, ``state``).
        owner: Model class name for error messages.
        spec: Names inside a decoder layer.
        rope: ``apply_rotary_pos_emb(q, k, cos, sin)``; default: the one in the layers' modeling module.
    """

    def __init__(
        self,
        language_model: nn.Module,
        runtime: Any,
        owner: str,
        spec: DecoderSpec | None = None,
        rope: Callable | None = None,
    ) -> None:
        self.lm = language_model
        self.runtime = runtime
        self.owner = owner
        self.spec = spec or DecoderSpec()
        self.layers = language_model.layers
        attn = getattr(self.layers[0], self.spec.attn)
        config = language_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        if rope is None:
            rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise TypeError(f"{type(attn).__name__} has no apply_rotary_pos_emb in its module; pass rope=")
        self.rope = rope
        self.forward_in_flight: _Forward | None = None
        # Set by the adapter before the text model runs: ``(visual, segments)`` or ``(visual, segments,
        # structural)``, each ``(B, L)``: visual tokens, their span id (-1: not visual; tokens sharing an id are
        # merged together) and structural tokens.
        self.pending_visual: tuple[torch.Tensor, ...] | None = None
        self.sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._plans: dict[tuple, VisualPlan] = {}
        self._originals: list[nn.Module] = []
        self._handles: list[Any] = []
        self._layer_macs = [
            (linear_macs(getattr(layer, self.spec.attn)), linear_macs(getattr(layer, self.spec.mlp)))
            for layer in self.layers
        ]

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def method(self) -> VisualTokenMethod:
        return self.runtime.method

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

    # ------------------------------------------------------------------------- FLOPs (2 x MAC)
    def layer_flops(self, layer: int, tokens: int) -> float:
        """FLOPs of one decoder layer run on ``tokens`` tokens (prefill: queries = keys = ``tokens``)."""
        attn_linear, mlp_linear = self._layer_macs[layer]
        attention = 4.0 * tokens * tokens * self.num_heads * self.head_dim  # QK^T and AV
        return 2.0 * tokens * (attn_linear + mlp_linear) + attention

    def score_flops(self, rows: int, tokens: int) -> float:
        """FLOPs of scoring ``rows`` query rows against ``tokens`` keys (all heads)."""
        return 2.0 * rows * tokens * self.num_heads * self.head_dim

    def prefill_flops(self, text: int, visual: list[int], rows: int) -> float:
        """LLM prefill FLOPs of one sample: ``text`` tokens, ``visual[l]`` visual tokens entering layer ``l``."""
        total = 0.0
        for layer, count in enumerate(visual):
            total += self.layer_flops(layer, text + count)
            if layer + 1 < len(visual) and visual[layer + 1] < count:
                total += self.score_flops(rows, text + count)
        return total

    def sample_flops(self, state: DecoderState, sample: int = 0) -> dict:
        """Analytic FLOPs of one sample of a prefill: merging before the LLM and each LLM layer.

        Returns:
            ``{"merge", "layers": [{"layer", "tokens_in", "tokens_out", "flops", "method_flops"}]}``: the
            sample's own tokens (no padding or fill), ``method_flops`` the scoring at a removing layer.
        """
        plan, text, rows = state.plans[sample], state.text[sample], state.rows[sample]
        channels = self.lm.config.hidden_size
        merge = sum(
            self.method.merge_flops(n, self.method.merged_count(n, plan.merge_keep), channels)
            for n in state.spans[sample]
        )
        visual = [counts[sample] for counts in state.targets_list]
        table = []
        for layer, count in enumerate(visual):
            after = visual[layer + 1] if layer + 1 < len(visual) else count
            overhead = self.score_flops(rows, text + count) if after < count else 0.0
            flops = self.layer_flops(layer, text + count) + overhead
            table.append(
                {
                    "layer": layer,
                    "tokens_in": text + count,
                    "tokens_out": text + after,
                    "flops": flops,
                    "method_flops": overhead,
                }
            )
        return {"merge": merge, "layers": table}

    # ------------------------------------------------------------------------- planning
    def plan(self, spans: list[int], text: int, rows: int) -> VisualPlan:
        """The plan of one sample with visual ``spans`` (tokens per image), ``text`` tokens, scoring ``rows``."""
        key = (tuple(spans), text, rows)
        if key not in self._plans:
            method, depth = self.method, self.depth
            budget = getattr(self.runtime.config, "flops", None)
            if not sum(spans):  # no visual token: nothing to plan, the prompt runs unreduced
                plan = VisualPlan(1.0, (1.0,) * depth)
            elif budget is None:
                plan = method.plan_for(depth)
            else:

                def cost(candidate: VisualPlan) -> float:
                    merged = sum(method.merged_count(n, candidate.merge_keep) for n in spans)
                    return self.prefill_flops(text, candidate.visual_counts(merged), rows)

                plan = method.solve_budget(budget, depth, sum(spans), cost)
            self._plans[key] = plan
        return self._plans[key]

    # ------------------------------------------------------------------------- masks
    def mask(self, key_valid: torch.Tensor | None, keys: int, hidden_states: torch.Tensor) -> Any:
        implementation = self.lm.config._attn_implementation
        q_len, dtype, device = hidden_states.shape[1], hidden_states.dtype, hidden_states.device
        return build_mask(key_valid, keys, q_len, implementation, dtype, device)

    def _check_cache(self, cache: Any) -> None:
        if cache is None:
            return
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = getattr(cache, "layers", [])
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers})
            raise NotImplementedError(
                f"tokenprune removes visual tokens with a DynamicCache of full-attention layers only, got "
                f"{type(cache).__name__} ({kinds}); use the default cache (cache_implementation='dynamic')"
            )

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
            return self._enter_decode(kwargs, session)
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

    def _enter_decode(self, kwargs: dict, session: CacheSession) -> tuple[tuple, dict]:
        x = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        batch, q_len = x.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            raise NotImplementedError("tokenprune: decoding on a compact cache needs a 2D attention_mask (or None)")
        device = session.shift.device
        new_valid = mask[:, -q_len:].bool() if mask is not None else None
        if new_valid is not None and bool(new_valid.all()):  # one host sync per step, not per layer
            new_valid = None
        for layer, valid in enumerate(session.key_valid):
            if valid is None and new_valid is not None:
                valid = torch.ones(batch, session.key_length[layer], dtype=torch.bool, device=new_valid.device)
            if valid is not None:
                fresh = new_valid if new_valid is not None else torch.ones_like(valid[:, :1]).expand(batch, q_len)
                session.key_valid[layer] = torch.cat([valid, fresh.to(valid.device)], dim=1)
            session.key_length[layer] += q_len
        if session.merged:
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = session.external_length + torch.arange(q_len, device=device).expand(batch, q_len)
            kwargs["position_ids"] = positions - session.shift[:, None].to(positions.device)
            first = session.key_valid[0]
            kwargs["attention_mask"] = None if first is None else first.long()
        session.external_length += q_len
        session.state.generated += q_len
        self.forward_in_flight = _Forward(decode=True, session=session)
        return (), kwargs

    def _enter_prefill(self, kwargs: dict, pending: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[tuple, dict]:
        x = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
        batch, length = x.shape[:2]
        device = x.device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            mask = None if pending is None else _refuse_4d_mask()
        valid = (
            mask[:, -length:].bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        structural = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if pending is not None:
            visual, segments, *layout = pending
            visual = visual.to(device) & valid
            segments = torch.where(visual, segments.to(device), -1)
            if layout and layout[0] is not None:
                structural = layout[0].to(device) & valid & ~visual
        else:
            visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
            segments = torch.full((batch, length), -1, dtype=torch.long, device=device)

        # Plan every sample: visual spans (tokens per image), text tokens, scoring rows.
        spans_per_sample = _spans(segments)
        text = (valid & ~visual).sum(dim=1).tolist()
        after = (visual.long().cumsum(dim=1) > 0) & valid & ~visual & ~structural
        rows = after.sum(dim=1).tolist() if self.method.query_rows == "text" else [1] * batch
        samples = zip(spans_per_sample, text, rows, strict=True)
        plans = [self.plan([len(p) for _, p in spans], t, r) for spans, t, r in samples]
        merge = any(p.merge_keep < 1.0 for p, spans in zip(plans, spans_per_sample, strict=True) if spans)

        index = torch.arange(length, device=device).expand(batch, length)
        size = valid.to(x.dtype)
        fwd = _Forward(decode=False, external_length=(mask.shape[1] if mask is not None else length))
        fwd.shift = torch.zeros(batch, dtype=torch.long, device=device)
        if merge:
            x = self._embeds(kwargs)
            x, index, valid, visual, size, structural, kwargs = self._merge(
                x, kwargs, valid, visual, structural, spans_per_sample, plans, fwd
            )
        merged_counts = visual.sum(dim=1).tolist()
        per_sample = [p.visual_counts(m) for p, m in zip(plans, merged_counts, strict=True)]
        targets_list = [[counts[layer] for counts in per_sample] for layer in range(self.depth)]
        targets = torch.tensor(targets_list, dtype=torch.long, device=device).reshape(self.depth, batch)
        fwd.state = DecoderState(
            index, valid, visual, size, length, plans, targets, targets_list, merged=merge, structural=structural
        )
        fwd.state.spans = [[len(p) for _, p in spans] for spans in spans_per_sample]
        fwd.state.text, fwd.state.rows = text, rows
        fwd.all_valid = bool(valid.all())
        fwd.active = merge or any(self._prunes(fwd.state, layer) for layer in range(self.depth))
        self.runtime.state = fwd.state
        self.forward_in_flight = fwd
        return (), kwargs

    def _merge(self, x, kwargs, valid, visual, structural, spans_per_sample, plans, fwd):
        """Merge visual spans before the LLM; returns the compacted sequence and the rewritten kwargs."""
        batch, length, _ = x.shape
        device = x.device
        keep = valid & ~visual
        x = x.clone()
        size = valid.to(x.dtype)
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
            local, merged, held = self.method.merge(x[rows[:, None], positions], target)  # (S, K), (S, K, C), (S, K)
            stored = positions.gather(1, local)
            x[rows[:, None], stored] = merged.to(x.dtype)
            size[rows[:, None], stored] = held.to(x.dtype)
            keep[rows[:, None], stored] = True
        removed = valid & ~keep  # merged away (padding is dropped too, but never counted)
        gather, slot_valid = compact(keep)
        external = kwargs.get("position_ids")
        if external is None:
            external = torch.arange(length, device=device).expand(batch, length)
        external = external.expand(batch, length) if external.ndim == 2 else external
        compact_positions = self.runtime.config.merge_positions == "compact"
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
        return x, index, slot_valid, visual, size, structural, kwargs

    # ------------------------------------------------------------------------- one prefill layer
    def _prunes(self, state: DecoderState, layer: int) -> bool:
        """Whether visual tokens are removed after ``layer`` (decided on the host from the plans)."""
        if layer + 1 >= self.depth:
            return False
        pairs = zip(state.targets_list[layer], state.targets_list[layer + 1], strict=True)
        return any(after < before for before, after in pairs)

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
            if layer == 0:
                self._check_cache(cache)
                depth = self.depth
                fwd.session = CacheSession(
                    [None] * depth, [0] * depth, [False] * depth, state.merged, fwd.shift, fwd.external_length, state
                )
                self.sessions[cache] = fwd.session
            if fwd.session is not None:
                fwd.session.key_valid[layer] = None if fwd.all_valid else state.valid
                fwd.session.key_length[layer] = state.num_tokens
                fwd.session.compact[layer] = state.version > 0
        tokens_in = hidden_states.shape[1]
        state.visual_in.append(state.visual.sum(dim=1))
        state.index_in.append(state.index)
        if not self._prunes(state, layer):
            out = wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
            state.log.append(LayerLog(layer, tokens_in, tokens_in))
            state.scored_rows.append(0)
            return out
        capture = wrapper.capture
        capture.active = True
        try:
            out = wrapper.base_layer(hidden_states, attention_mask=attention_mask, **kwargs)
        finally:
            capture.active = False
        queries, keys = capture.pop()
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
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            structural=state.structural,
        )
        scores = self.method.importance(ctx).float()  # (B, N)
        keep = (state.valid & ~state.visual) | _top_visual(scores, state.visual, state.targets[layer + 1])
        gather, slot_valid = compact(keep)
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
        state.index = torch.where(slot_valid, state.index.gather(1, gather), -1)
        state.visual = state.visual.gather(1, gather) & slot_valid
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


def _refuse_4d_mask() -> None:
    raise NotImplementedError(
        "tokenprune cannot reduce visual tokens under a caller-supplied 4D attention mask; pass a 2D padding "
        "mask, or run that call inside tokenprune.disabled(model)"
    )


def _top_visual(scores: torch.Tensor, visual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` the ``target[b]`` highest-scoring visual tokens of every sample (ties: earlier first)."""
    masked = torch.where(visual, scores, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return visual & (ranks < target[:, None])


def _spans(segments: torch.Tensor) -> list[list[tuple[int, list[int]]]]:
    """Per sample, ``(segment, positions)`` of each visual span (id -1 is not visual), in order.

    A span is a maximal run of one id among a sample's visual tokens: it may straddle non-visual tokens (e.g. a
    high-resolution grid whose rows end in structural newline tokens). ``positions`` ascend.
    """
    out: list[list[tuple[int, list[int]]]] = [[] for _ in range(segments.shape[0])]
    cpu = segments.cpu()
    if not bool((cpu >= 0).any()):
        return out
    for b, row in enumerate(cpu):
        positions = (row >= 0).nonzero().squeeze(1)
        ids, counts = torch.unique_consecutive(row[positions], return_counts=True)
        for segment, span in zip(ids.tolist(), positions.split(counts.tolist()), strict=True):
            out[b].append((segment, span.tolist()))
    return out

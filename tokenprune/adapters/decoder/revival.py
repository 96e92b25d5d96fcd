"""LazyLLM's aux cache: pruned tokens' hidden states, and their revival at decoding steps.

The prefill is :class:`~tokenprune.adapters.vlm.reducer.DecoderReducer`'s (real removal, original rotary
positions, compact KV cache); :class:`RevivingReducer` adds what revival needs, per compact cache:

* **Prefill**: at every layer, the input position of each token the layer caches (``slots``); after a pruning layer
  ``p``, the layer-``p`` output hidden state of each token pruned there, with its cos/sin (``aux[p]``).
* **Decode step** (one new token per sample): layer 0 selects every cached token. At layer ``l`` a selected token
  that layer ``l``'s cache lacks is revived: its hidden state is taken from ``aux[l - 1]`` (where it was pruned,
  or where an earlier revival left it), and it runs through layer ``l`` beside the new token, attending to every
  cached token that precedes it (and to the tokens revived with it): the layer appends its keys and values to
  its cache, and its output goes to ``aux[l]``. The new token attends to the selected tokens only. After a layer
  where the prefill pruned, the new token's attention (head-averaged softmax over its selected tokens, from the
  cached rotary-embedded keys) selects the top tokens for the next layer, as many as the prefill kept there.

Invariant: ``aux[l]`` holds exactly the tokens in layer ``l``'s cache that layer ``l + 1``'s cache lacks, so
every token is computed at most once per layer. Beam search's cache reordering reorders the bookkeeping too
(:func:`follow_reorder`). Decode steps inside ``tokenprune.disabled`` run on the compact cache without revival, and
end revival for that cache (its bookkeeping would miss that step's tokens). A later call of several tokens per
sample on the cache (a second turn) is refused while revival is on (``revive=False`` runs it on the compact cache).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.vlm.decode_selection import head_averaged_attention
from tokenprune.adapters.vlm.layer import ReducingDecoderLayer
from tokenprune.adapters.vlm.reducer import DecoderReducer
from tokenprune.core.sequence import compact, gather_seq, top_per_row


def members(index: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size)`` bool: which input positions ``index`` ``(B, K)`` holds (-1 entries hold none)."""
    out = torch.zeros(index.shape[0], size + 1, dtype=torch.bool, device=index.device)
    return out.scatter_(1, torch.where(index >= 0, index, size), True)[:, :size]


def allowed_to_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``(B, Q, K)`` allowed pairs as the layer's attention mask ``(B, 1, Q, K)`` (bool for SDPA, additive else)."""
    mask = allowed[:, None]
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


@dataclass
class AuxEntries:
    """Hidden states of tokens held by one layer's cache but not the next layer's (``B`` samples, ``A`` slots).

    Attributes:
        hidden: ``(B, A, C)`` the layer's output hidden state of each.
        index: ``(B, A)`` input position, -1 for fill or an entry revived since.
        cos: ``(B, A, D)`` its rotary cos (original position).
        sin: ``(B, A, D)`` its rotary sin.
    """

    hidden: torch.Tensor
    index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def extend(self, other: AuxEntries) -> AuxEntries:
        return AuxEntries(*(torch.cat([a, b], dim=1) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return self.hidden, self.index, self.cos, self.sin


@dataclass
class AuxCache:
    """Revival bookkeeping of one compact KV cache (``B`` samples, prompt of ``length`` input positions).

    Attributes:
        slots: Per layer, ``(B, K_l)`` input position of each key its cache holds (-1: padding or fill);
            generated tokens have positions ``length, length + 1, ...``.
        aux: Per layer, the :class:`AuxEntries` of tokens its cache holds and the next layer's lacks (or None).
        prunable: ``(B, length)`` prompt tokens a selection may leave out (every valid one but the last).
        targets: Per layer, per sample, prunable tokens a decoding token attends to there (the prefill's counts).
        length: Input positions of the prompt.
        session: The reducer's ``CacheSession`` of the same cache (the aux cache is void once that is replaced).
        revived: One ``(step, layer, index)`` per layer that revived tokens: ``index`` ``(B, R)`` their input
            positions (-1: fill).
        selected: ``(B, U)`` the decoding token's selection entering the current layer (during a step).
        active: False once a step ran without revival (inside ``tokenprune.disabled``).
    """

    slots: list[torch.Tensor | None]
    aux: list[AuxEntries | None]
    prunable: torch.Tensor
    targets: list[list[int]]
    length: int
    session: Any
    revived: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    selected: torch.Tensor | None = None
    active: bool = True


def follow_reorder(cache: Any, reducer: RevivingReducer) -> None:
    """Make beam search's ``cache.reorder_cache(beam_idx)`` reorder the aux cache's rows too.

    Beams of one prompt revive different tokens, so their rows of the bookkeeping differ; the method is wrapped on
    this cache object only (once), and reorders whatever aux cache the reducer holds for it.
    """
    if getattr(cache, "_tokenprune_follows_reorder", False):
        return
    original = cache.reorder_cache

    def reorder_cache(beam_idx: torch.LongTensor) -> None:
        original(beam_idx)
        aux = reducer.aux.get(cache)
        if aux is None:
            return
        index = beam_idx.tolist()
        aux.slots = [None if t is None else t[beam_idx.to(t.device)] for t in aux.slots]
        aux.aux = [None if e is None else AuxEntries(*(t[beam_idx.to(t.device)] for t in e.astuple())) for e in aux.aux]
        aux.prunable = aux.prunable[beam_idx.to(aux.prunable.device)]
        aux.targets = [[row[i] for i in index] for row in aux.targets]
        session = aux.session
        session.key_valid = [None if t is None else t[beam_idx.to(t.device)] for t in session.key_valid]

    cache.reorder_cache = reorder_cache
    cache._tokenprune_follows_reorder = True


class RevivingDecoderLayer(ReducingDecoderLayer):
    """A :class:`ReducingDecoderLayer` that records its full output during a prefill and revives at decode steps."""

    def __init__(self, base_layer: nn.Module, layer: int, reducer: RevivingReducer) -> None:
        super().__init__(base_layer, layer, reducer)
        self.record = False
        self.recorded: torch.Tensor | None = None
        self._record_handle = base_layer.register_forward_hook(self._keep_output)

    def _keep_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.record:
            self.recorded = output[0] if isinstance(output, tuple) else output  # a reference, nothing copied

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        fwd = self.reducer.forward_in_flight
        if fwd is not None and fwd.decode:
            aux = self.reducer.aux.get(kwargs.get("cache", kwargs.get("past_key_values")))
            if aux is not None and aux.session is fwd.session and aux.active:
                if not self.reducer.runtime.enabled:
                    aux.active = False  # this step's tokens bypass the bookkeeping: no revival from here on
                else:
                    return self.reducer.decode_layer(self, hidden_states, kwargs, aux)
        return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)

    def remove_hooks(self) -> None:
        super().remove_hooks()
        self._record_handle.remove()


class RevivingReducer(DecoderReducer):
    """A :class:`DecoderReducer` with LazyLLM's aux cache (see the module docstring)."""

    def __init__(self, *args: Any, revive: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.revive = revive
        self.aux: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> AuxCache

    def install(self) -> None:
        if not self.revive:
            return super().install()
        self._originals = list(self.layers)
        for index, layer in enumerate(self._originals):
            self.layers[index] = RevivingDecoderLayer(layer, index, self)
        self._handles = [
            self.lm.register_forward_pre_hook(self._entry, with_kwargs=True),
            self.lm.register_forward_hook(self._exit, always_call=True),
        ]

    # ------------------------------------------------------------------------- prefill: fill the aux cache
    def run_prefill_layer(
        self, wrapper: ReducingDecoderLayer, hidden_states: torch.Tensor, attention_mask: Any, kwargs: dict
    ) -> torch.Tensor:
        fwd, layer = self.forward_in_flight, wrapper.layer
        if not isinstance(wrapper, RevivingDecoderLayer) or not fwd.active:
            return super().run_prefill_layer(wrapper, hidden_states, attention_mask, kwargs)
        state = fwd.state
        index_in, valid_in, prunable_in, version = state.index, state.valid, state.prunable, state.version
        wrapper.record = True
        try:
            out = super().run_prefill_layer(wrapper, hidden_states, attention_mask, kwargs)
        finally:
            wrapper.record = False
        full, wrapper.recorded = wrapper.recorded, None  # (B, N_in, C)
        if fwd.session is None:  # no cache: nothing to revive into
            return out
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if layer == 0:
            follow_reorder(cache, self)
            self.aux[cache] = AuxCache(
                [None] * self.depth,
                [None] * self.depth,
                prunable_in,  # layer 0's input: (B, L) in input positions
                state.targets_list,
                state.num_original,
                fwd.session,
            )
        aux = self.aux[cache]
        aux.slots[layer] = torch.where(valid_in, index_in, -1)  # (B, N_in): what this layer cached
        if state.version > version:  # tokens were pruned after this layer: keep their hidden states
            kept = members(torch.where(state.valid, state.index, -1), state.num_original)  # (B, L)
            pruned = valid_in & ~kept.gather(1, index_in.clamp(min=0))  # (B, N_in)
            gather, slot_valid = compact(pruned)  # (B, A)
            cos, sin = kwargs["position_embeddings"]  # the ones this layer used (its input tokens)
            aux.aux[layer] = AuxEntries(
                full.gather(1, gather[..., None].expand(-1, -1, full.shape[-1])),
                torch.where(slot_valid, index_in.gather(1, gather), -1),
                gather_seq(cos, gather),
                gather_seq(sin, gather),
            )
        return out

    # ------------------------------------------------------------------------- decode: revive
    def _prunes_at(self, aux: AuxCache, layer: int) -> bool:
        """Whether the prefill kept fewer prunable tokens for layer ``layer + 1`` than for ``layer``."""
        if layer + 1 >= self.depth:
            return False
        return any(b < a for a, b in zip(aux.targets[layer], aux.targets[layer + 1], strict=True))

    def _take(self, aux: AuxCache, layer: int, need: torch.Tensor) -> AuxEntries | None:
        """Remove the tokens ``need`` ``(B, U)`` from ``aux[layer - 1]``; returns them ``(B, R, ...)`` or None."""
        entries = aux.aux[layer - 1] if layer > 0 else None
        if not bool(need.any()):
            return None
        if entries is None:
            raise RuntimeError(f"tokenprune: lazyllm aux cache has no entries before layer {layer} to revive from")
        size = need.shape[1]
        take = (entries.index >= 0) & need.gather(1, entries.index.clamp(min=0, max=size - 1))  # (B, A)
        if int(take.sum()) != int(need.sum()):
            raise RuntimeError(f"tokenprune: lazyllm aux cache lacks tokens layer {layer} must revive")
        gather, slot_valid = compact(take)  # (B, R)
        channels = entries.hidden.shape[-1]
        hidden = entries.hidden.gather(1, gather[..., None].expand(-1, -1, channels))
        revived = AuxEntries(
            torch.where(slot_valid[..., None], hidden, 0),
            torch.where(slot_valid, entries.index.gather(1, gather), -1),
            gather_seq(entries.cos, gather),
            gather_seq(entries.sin, gather),
        )
        entries.index = torch.where(take, -1, entries.index)  # now in layer ``layer``'s cache
        return revived

    def decode_layer(
        self, wrapper: RevivingDecoderLayer, hidden_states: torch.Tensor, kwargs: dict, aux: AuxCache
    ) -> torch.Tensor:
        """Run one decoding step's layer with revival (``hidden_states`` ``(B, 1, C)``); returns ``(B, 1, C)``."""
        batch, q_len, _ = hidden_states.shape
        if q_len != 1:
            raise NotImplementedError(
                "tokenprune: lazyllm revival decodes one token per step per sample; got "
                f"{q_len} (use revive=False for multi-token decode calls)"
            )
        fwd, layer = self.forward_in_flight, wrapper.layer
        session = fwd.session
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        device = hidden_states.device
        new = aux.length + session.state.generated - 1  # input position of the new token
        size = new + 1
        slots = aux.slots[layer]  # (B, K)
        if cache.layers[layer].keys.shape[-2] != slots.shape[1]:
            raise RuntimeError("tokenprune: lazyllm's aux cache no longer matches the KV cache (was it edited?)")
        if layer == 0:
            aux.selected = members(slots, size)
            aux.selected[:, new] = True
        selected = aux.selected  # (B, U)
        need = selected & ~members(slots, size)
        need[:, new] = False
        revived = self._take(aux, layer, need)
        cos, sin = kwargs["position_embeddings"]  # (B or 1, 1, D): the new token's
        new_index = torch.full((batch, 1), new, dtype=torch.long, device=device)
        if revived is None:
            x, rev_index, count = hidden_states, new_index[:, :0], 0
        else:
            rev_index, count = revived.index, revived.index.shape[1]
            x = torch.cat([revived.hidden.to(hidden_states.dtype), hidden_states], dim=1)  # (B, R + 1, C)
            cos = torch.cat([revived.cos.to(cos.dtype), cos.expand(batch, -1, -1)], dim=1)
            sin = torch.cat([revived.sin.to(sin.dtype), sin.expand(batch, -1, -1)], dim=1)
        q_index = torch.cat([rev_index, new_index], dim=1)  # (B, R + 1)
        k_index = torch.cat([slots, q_index], dim=1)  # (B, K + R + 1): the cache after this layer
        k_valid = k_index >= 0
        # A revived token attends to every cached token before it, as in the prefill; fill rows to themselves only.
        allowed = k_valid[:, None, :] & (k_index[:, None, :] <= q_index[:, :, None])  # (B, R + 1, K')
        fill = torch.arange(count, device=device)
        allowed[:, fill, slots.shape[1] + fill] |= rev_index < 0
        new_row = k_valid & selected.gather(1, k_index.clamp(min=0))  # (B, K'): the new token, its selection
        allowed[:, -1] = new_row
        kwargs = dict(kwargs, position_embeddings=(cos, sin), position_ids=None)
        mask = allowed_to_mask(allowed, self.lm.config._attn_implementation, x.dtype)
        score = self._prunes_at(aux, layer)
        if score:
            wrapper.capture.active = True
        try:
            out = wrapper.base_layer(x, attention_mask=mask, **kwargs)
        finally:
            wrapper.capture.active = False
        out = out[0] if isinstance(out, tuple) else out  # (B, R + 1, C)
        if score:
            queries, _ = wrapper.capture.pop()  # (B, H, R + 1, D) before the rotary embedding
            aux.selected = self._select(
                aux, layer, queries[:, :, -1:], cos[:, -1:], sin[:, -1:], cache, k_index, new_row
            )
            aux.selected[:, new] = True
        if revived is not None:  # the revived tokens' keys and values are in this layer's cache now
            self._grow(session, aux, layer, revived, out[:, :count], cos[:, :count], sin[:, :count])
        aux.slots[layer] = k_index
        return out[:, -1:]

    def _grow(self, session, aux, layer, revived, hidden, cos, sin) -> None:
        """Book the ``R`` tokens revived at ``layer``: cache validity, and their outputs into ``aux[layer]``."""
        valid = revived.index >= 0  # (B, R)
        key_valid = session.key_valid[layer]  # (B, K + 1) with the new token's entry last, or None
        if key_valid is None and not bool(valid.all()):
            key_valid = torch.ones(valid.shape[0], session.key_length[layer], dtype=torch.bool, device=valid.device)
        if key_valid is not None:
            session.key_valid[layer] = torch.cat([key_valid[:, :-1], valid, key_valid[:, -1:]], dim=1)
        session.key_length[layer] += valid.shape[1]
        session.compact[layer] = True
        entries = AuxEntries(hidden, revived.index, cos, sin)
        aux.aux[layer] = entries if aux.aux[layer] is None else aux.aux[layer].extend(entries)
        aux.revived.append((session.state.generated, layer, revived.index))

    def _select(self, aux, layer, query, cos, sin, cache, k_index, allowed) -> torch.Tensor:
        """The new token's selection for ``layer + 1``: its top prunable tokens by attention at ``layer``.

        Args:
            query: ``(B, H, 1, D)`` its query before the rotary embedding; ``cos``/``sin`` ``(B, 1, D)`` its own.
            k_index: ``(B, K')`` input position of each slot of this layer's cache (-1: fill).
            allowed: ``(B, K')`` the slots it attended to (its selection at this layer, itself included).

        Returns:
            ``(B, U)`` the selection: every non-prunable token selected at this layer, plus the top
            ``targets[layer + 1]`` prunable ones.
        """
        q = self.rope(query, query, cos, sin)[0]  # (B, H, 1, D)
        probs = head_averaged_attention(q, cache.layers[layer].keys, allowed, self.scale)  # (B, K')
        length = aux.length
        inside = (k_index >= 0) & (k_index < length)
        prunable = inside & aux.prunable.gather(1, k_index.clamp(0, length - 1))  # (B, K')
        counts = torch.tensor(aux.targets[layer + 1], dtype=torch.long, device=q.device)
        kept = top_per_row(probs, allowed & prunable, counts)  # (B, K')
        selected = aux.selected.clone()
        selected[:, :length] &= ~aux.prunable
        return selected | members(torch.where(kept, k_index, -1), selected.shape[1])

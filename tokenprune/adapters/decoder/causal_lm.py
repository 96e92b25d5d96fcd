"""Text-only decoder LLMs, transformers 5.x unforked: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``.

The three share one layout (``model.model.layers[i].self_attn`` with ``q_proj``/``k_proj``, Qwen3's ``q_norm``/
``k_norm`` read by :class:`~tokenprune.adapters.vlm.layer.DecoderSpec`), so a family is one row of
:data:`FAMILIES`, not a class. The language-model side is the VLM adapters' own
(:class:`~tokenprune.adapters.vlm.reducer.DecoderReducer`, here with LazyLLM's aux cache,
:class:`~tokenprune.adapters.decoder.revival.RevivingReducer`): the layers are wrapped, never copied; the method prunes
text (``prunes_text``), so the reducer's prunable tokens are every valid prompt token but each sample's last (the one
that predicts the next token). Real removal under SDPA or eager, original rotary positions, left- or right-padded
batches (each sample as alone), a compact ``DynamicCache`` that ``generate()`` decodes on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from tokenprune.adapters.base import Adapter, hf_classes, linear_macs
from tokenprune.adapters.decoder.revival import AuxCache, RevivingReducer
from tokenprune.adapters.vlm.flops import DecoderFlops, sample_table
from tokenprune.adapters.vlm.layer import DecoderSpec
from tokenprune.adapters.vlm.masks import check_decoder_attention
from tokenprune.adapters.vlm.state import DecoderState
from tokenprune.methods.vlm import VisualTokenMethod
from tokenprune.registry import register_adapter

#: Supported causal-LM classes and the layout of their decoder layers.
FAMILIES: dict[str, DecoderSpec] = {
    "LlamaForCausalLM": DecoderSpec(),
    "Qwen2ForCausalLM": DecoderSpec(),
    "Qwen3ForCausalLM": DecoderSpec(),  # per-head q_norm/k_norm: the spec reads the queries and keys after them
}


class CausalLMAdapter(Adapter):
    """A text-only decoder LLM of :data:`FAMILIES`: prompt tokens pruned inside the decoder."""

    kind = "llm"
    description = "transformers " + " / ".join(FAMILIES)
    has_static_size = True
    has_class_token = False
    num_protected = 0
    decoder: ClassVar[DecoderSpec] = DecoderSpec()

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        owner = type(model).__name__
        self.decoder = next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)
        if self.decoder is None:
            raise TypeError(f"unsupported model type {owner}; supported: {list(FAMILIES)}")
        self.language_model = model.model
        config = self.language_model.config
        check_decoder_attention(config, owner)
        for index, layer in enumerate(self.language_model.layers):
            missing = self.decoder.missing(layer)
            if missing:
                raise TypeError(f"layer {index} ({type(layer).__name__}) of {owner} lacks {missing}")
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise NotImplementedError(
                f"{owner} uses sliding-window attention layers; tokenprune prunes prompt tokens in full-attention "
                "decoders only (load it with use_sliding_window=False)"
            )
        self.depth = len(self.language_model.layers)
        self.llm_flops = DecoderFlops(self.language_model, self.decoder)
        self.num_heads, self.head_dim = self.llm_flops.num_heads, self.llm_flops.head_dim
        self.method: Any = None
        self.reducer: RevivingReducer | None = None
        self._handles: list[Any] = []

    # ----------------------------------------------------------------- what apply() asks
    def num_tokens(self, input_size: Any = None) -> int:
        raise NotImplementedError("a decoder LLM's token count is each prompt's length")

    def resolve_schedule(self, runtime: Any) -> list[float] | None:
        """Check the method; the per-layer fractions of prunable tokens (None for a FLOPs budget)."""
        method = runtime.method
        if not isinstance(method, VisualTokenMethod) or not method.prunes_text:
            raise TypeError(f"method {method.name!r} cannot prune prompt tokens of a decoder LLM (it has no text)")
        if getattr(runtime.config, "flops", None) is not None:
            return None
        return list(method.plan_for(self.depth).fractions)

    # ----------------------------------------------------------------- install / uninstall
    def install(self, runtime: Any) -> None:
        self.method = runtime.method
        owner = type(self.model).__name__
        revive = bool(runtime.method.revives)
        self.reducer = RevivingReducer(self.language_model, runtime, owner, self.decoder, self.llm_flops, revive=revive)
        self.reducer.install()  # the method prunes text: the reducer finds the prunable prompt tokens itself
        self._handles = [self.model.register_forward_pre_hook(self._check_labels, with_kwargs=True)]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.reducer is not None:
            self.reducer.uninstall()
            self.reducer = None

    def _check_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        runtime = self.reducer.runtime
        if kwargs.get("labels") is not None and runtime.enabled:
            if (
                getattr(runtime.config, "flops", None) is not None
                or not runtime.method.plan_for(self.depth).is_identity
            ):
                raise NotImplementedError(
                    "labels are not supported while prompt tokens are pruned (the logits have one row per kept "
                    "token, see patch.state.index); run that call inside tokenprune.disabled(model)"
                )

    def aux_cache(self, cache: Any) -> AuxCache | None:
        """LazyLLM's aux cache of a compact ``cache`` this patch's prefill filled (None: none)."""
        if self.reducer is None or not hasattr(self.reducer, "aux"):
            return None
        aux = self.reducer.aux.get(cache)
        return aux if aux is not None and aux.session is self.reducer.sessions.get(cache) else None

    # ----------------------------------------------------------------- FLOPs (2 x MAC)
    def embed_flops(self, num_tokens: int) -> float:
        return 0.0

    def head_flops(self, num_tokens: int) -> float:
        return 2.0 * num_tokens * linear_macs(self.model.lm_head)

    def prefill_flops(self, num_tokens: int, plan: Any = None) -> float:
        """LLM-layer prefill FLOPs of one prompt of ``num_tokens`` under ``plan`` (None: unreduced; head excluded)."""
        prunable = max(0, num_tokens - 1)
        counts = [prunable] * self.depth if plan is None else plan.visual_counts(prunable)
        return self.llm_flops.prefill(num_tokens - prunable, counts, 1)

    def analytic_flops(self, num_tokens: int, schedule: list[int], method: Any = None, rows: int = 1) -> dict:
        """Per-layer FLOPs of one prompt: ``num_tokens`` entering, ``schedule[l]`` pruned after layer ``l``."""
        tokens_in, tokens = [], num_tokens
        for removed in schedule:
            tokens_in.append(tokens)
            tokens -= removed
        tokens_out = [n - removed for n, removed in zip(tokens_in, schedule, strict=True)]
        table = self.llm_flops.rows(tokens_in, tokens_out, rows)
        head = self.head_flops(tokens)
        return {"embed": 0.0, "head": head, "total": head + sum(r["flops"] for r in table), "layers": table}

    def flops_for(self, state: DecoderState, sample: int = 0) -> dict:
        """Analytic FLOPs of one sample of a pruned prefill, from ``patch.state`` (head on every output row)."""
        layers = sample_table(self.llm_flops, self.method, state, sample)["layers"]
        head = self.head_flops(layers[-1]["tokens_out"])
        return {"embed": 0.0, "head": head, "total": head + sum(r["flops"] for r in layers), "layers": layers}


register_adapter(hf_classes(*FAMILIES), CausalLMAdapter, CausalLMAdapter.description)

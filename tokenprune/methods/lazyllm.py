"""``lazyllm``: LazyLLM (Fu et al., 2024), "Dynamic Token Pruning for Efficient Long Context LLM Inference".

Prompt tokens are pruned progressively along the depth: after each pruning layer ``p`` of ``layers``, the tokens
the last prompt token attends to least at layer ``p`` (attention averaged over heads) are dropped, keeping the top
``keep`` fraction of the tokens still present, so the kept share is cumulative (``keep``, ``keep^2``, ...). The last
prompt token (the one that predicts the first generated token) is never pruned. Later layers compute on, and cache,
only the kept tokens: time to first token is what this buys.

An auxiliary cache (the adapter's, :mod:`tokenprune.adapters.decoder.revival`) holds the layer-``p`` hidden state
of every token pruned after layer ``p``. At each decoding step the new token repeats the selection layer by layer
(top ``keep`` by its own attention among the tokens it selected at the previous stage); a selected token that a
layer's cache lacks is *revived*: its computation resumes from the hidden state stored where it was pruned, its
keys and values join that layer's cache, and it stays there for later steps. A token is computed at most once per
layer.

What we kept from the paper: the criterion (previous layer's attention from the last token, head-averaged), the
progressive cumulative top-percentile schedule at a few layers, the aux cache of hidden states and revival at
decode steps that resumes from the pruning layer, the last token never pruned.

What we changed: the attention row is recomputed for the last token only (``(1 x D) @ (D x N)`` per head on the
layer's own rotary-embedded queries and keys), so the layers keep fused SDPA and never materialise an attention
map; tokens are removed for real (shorter tensors, compact KV cache), not masked; batches of padded prompts get
per-sample selections, and beams of a beam search revive on their own. At decode steps the new token's scores come
from the cached (rotary-embedded) keys of the tokens it selected at that layer, softmax restricted to them; a
revived token attends to every token of its layer's cache that precedes it (and to the tokens revived with it), as
in the prefill (tokens computed while it was absent are not recomputed, as in the paper). The paper's exact
pruning layers per model were not in the text we could read; our default prunes after 1/4, 1/2 and 3/4 of the
depth with ``keep=0.7`` (about 63% of the prompt's layer-token work, near the ~64% of prompt tokens computed the
paper reports on multi-document QA). ``flops=`` solves ``keep`` for a fraction of the LLM prefill FLOPs.

Models: text-only decoders (kind ``"llm"``) and every vision-language family (kind ``"vlm"``). The paper is
text-only; on a VLM we do what it does to a prompt: visual and text tokens alike are prunable (``prunes_text``:
every real prompt token but each sample's last and the family's structural tokens, e.g. LLaVA-OneVision's
``image_newline``), ranked together by the last token's attention; kept tokens keep their original rotary
positions (Qwen's 3-axis M-RoPE ones too), and a revived token its own. A text-only prompt to a VLM is pruned as
well. Revival needs every layer to be full causal attention over the cache with masks tokenprune builds, and
nothing but the layers to change hidden states after a pruning layer: on Gemma 3 (sliding windows, bidirectional
image blocks) and Qwen3.5 (recurrent layers), and on Qwen3-VL when a pruning layer is one of its DeepStack layers,
``revive`` defaults to off (decode steps attend to the compact cache) and ``revive=True`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.methods.vlm import (
    DecoderLayerContext,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
)
from tokenprune.registry import register_method


@dataclass
class LazyLLMConfig(VLMReductionConfig):
    """LazyLLM (Fu et al., 2024): progressive pruning of prompt tokens by the last token's attention, revivable.

    Attributes:
        layers: Pruning layers: after layer ``p`` the tokens are ranked by the last token's attention at ``p`` and
            the top ``keep`` of them go on; strictly increasing, each in ``[0, depth - 2]``. Default None: the
            layers at 1/4, 1/2 and 3/4 of the depth, minus one (``(7, 15, 23)`` of 32: layers 8, 16, 24 on see
            fewer tokens).
        keep: Fraction of the tokens still present kept at each pruning layer (cumulative), in [0, 1]; default 0.7.
            Give ``keep`` or ``flops``, not both.
        revive: Keep an aux cache of pruned tokens' hidden states and revive the ones each decoding step selects
            (False: decoding attends to the compact cache as the prefill left it). Default None: revive where the
            model can (decoders of full causal attention layers: every family but Gemma 3 and Qwen3.5, whose
            sliding-window / recurrent layers a revived token cannot re-enter, and Qwen3-VL when pruning within
            its DeepStack layers), else not; True there is refused.
    """

    layers: tuple[int, ...] | None = None
    keep: float | None = None
    revive: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = (layers,)
            if not isinstance(layers, (list, tuple)) or not layers:
                raise TypeError(f"layers must be a non-empty list of ints (pruning layers), got {self.layers!r}")
            if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in layers):
                raise ValueError(f"layers must be ints >= 0 (pruning layers), got {self.layers!r}")
            if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
                raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
            self.layers = tuple(layers)
        if self.revive is not None and not isinstance(self.revive, bool):
            raise TypeError(f"revive must be a bool or None (where the model can), got {self.revive!r}")
        self.ratio_or_flops("keep", 0.7)


class LazyLLM(VisualTokenMethod):
    """Progressive top-``keep`` pruning of prompt tokens by the last token's attention; pruned tokens revivable."""

    name = "lazyllm"
    kinds = frozenset({"llm", "vlm"})
    identity = {"keep": 1.0}
    example = {"layers": (0, 2), "keep": 0.6}
    query_rows = "last"
    budget_parameter = "keep"
    #: Text tokens are pruned too (every prompt token but structural ones and each sample's last).
    prunes_text = True

    #: Whether the adapter keeps an aux cache and revives pruned tokens at decode steps (``revive``, resolved
    #: for the model by :meth:`check_model`).
    revives = True

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        refusal = None
        if hasattr(adapter, "revival_refusal"):
            refusal = adapter.revival_refusal(self.pruning_layers(adapter.depth))
        if refusal and self.config.revive:
            raise NotImplementedError(
                f"lazyllm revive=True cannot run on {type(adapter.model).__name__}: {refusal}; pass revive=False "
                "or leave it unset (decode steps then attend to the compact cache the prefill left)"
            )
        self.revives = self.config.revive if self.config.revive is not None else refusal is None

    def pruning_layers(self, depth: int) -> tuple[int, ...]:
        """The layers after which tokens are pruned, for a model of ``depth`` layers."""
        if self.config.layers is not None:
            return self.config.layers
        return tuple(sorted({max(0, min(depth - 2, depth * q // 4 - 1)) for q in (1, 2, 3)}))

    def validate(self, depth: int) -> None:
        if depth < 2:
            raise ValueError(f"lazyllm needs a model of at least 2 layers, got {depth}")
        layers = self.pruning_layers(depth)
        if layers[-1] > depth - 2:
            raise ValueError(
                f"lazyllm layers={list(layers)} are out of range for a model of {depth} layers: each must be in "
                f"[0, {depth - 2}] (tokens are pruned after that layer, for the next)"
            )

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        keep = self.config.keep if value is None else value
        layers = self.pruning_layers(depth)
        # Layer l sees keep^(pruning layers before it) of the prunable tokens.
        return VisualPlan(1.0, tuple(keep ** sum(p < layer for p in layers) for layer in range(depth)))

    def candidates(self, visual: int) -> list[float]:
        return [c / 200 for c in range(201)]

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        rows, row_valid = ctx.last_rows()  # (B, 1): the last prompt token of every sample
        return ctx.attention_rows(rows, row_valid)[:, 0]  # (B, N)


register_method("lazyllm", LazyLLMConfig, LazyLLM)

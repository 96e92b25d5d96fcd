"""Analytic FLOPs (2 x MAC) of a vision-language model, written once: vision tower, LLM layers, scoring, tables.

Every family's ``flops_for`` / ``analytic_flops`` is built from these pieces, so a person can check a row by hand:
a decoder layer on ``n`` tokens costs ``2 n (attention + MLP linear MACs) + 4 n^2 H D`` (``QK^T`` and ``AV``), a
pruning layer adds the scoring product of its query rows against every key (``2 rows n H D``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenprune.adapters.base import linear_macs
from tokenprune.adapters.vlm.layer import DecoderSpec


class DecoderFlops:
    """Per-layer FLOPs of one text model (``LlamaModel``, ``Qwen2Model``, ...) in the layout ``spec``."""

    def __init__(self, language_model: nn.Module, spec: DecoderSpec) -> None:
        layers = language_model.layers
        attn = next(getattr(layer, spec.attn) for layer in layers if hasattr(layer, spec.attn))
        self.num_heads = language_model.config.num_attention_heads
        self.head_dim = attn.head_dim
        self.hidden_size = language_model.config.hidden_size
        # A layer without ``spec.attn`` (a hybrid decoder's linear-attention layer): its family counts its mixer.
        self._macs = [
            (
                linear_macs(getattr(layer, spec.attn)) if hasattr(layer, spec.attn) else 0,
                linear_macs(getattr(layer, spec.mlp)),
            )
            for layer in layers
        ]

    @property
    def depth(self) -> int:
        return len(self._macs)

    def layer(self, layer: int, tokens: int) -> float:
        """One decoder layer run on ``tokens`` tokens (prefill: queries = keys = ``tokens``)."""
        attn_linear, mlp_linear = self._macs[layer]
        attention = 4.0 * tokens * tokens * self.num_heads * self.head_dim  # QK^T and AV
        return 2.0 * tokens * (attn_linear + mlp_linear) + attention

    def score(self, rows: int, tokens: int) -> float:
        """Scoring ``rows`` query rows against ``tokens`` keys (all heads)."""
        return 2.0 * rows * tokens * self.num_heads * self.head_dim

    def rows(
        self, tokens_in: list[int], tokens_out: list[int], rows: int, extra: list[float] | None = None
    ) -> list[dict]:
        """The per-layer table: each layer on its input tokens, plus the scoring where it removes tokens.

        ``extra``: per layer, what the method spends at a removal besides scoring (:func:`pruning_extra`).

        Returns:
            ``[{"layer", "tokens_in", "tokens_out", "flops", "method_flops"}]``, one per layer.
        """
        table = []
        for layer, (n_in, n_out) in enumerate(zip(tokens_in, tokens_out, strict=True)):
            overhead = self.score(rows, n_in) if n_out < n_in else 0.0
            if extra is not None and n_out < n_in:
                overhead += extra[layer]
            flops = self.layer(layer, n_in) + overhead
            table.append(
                {"layer": layer, "tokens_in": n_in, "tokens_out": n_out, "flops": flops, "method_flops": overhead}
            )
        return table

    def prefill(self, text: int, visual: list[int], rows: int, extra: list[float] | None = None) -> float:
        """LLM prefill FLOPs of one sample: ``text`` tokens, ``visual[l]`` visual tokens entering layer ``l``
        (``extra``: as in :meth:`rows`)."""
        total = 0.0
        for layer, count in enumerate(visual):
            total += self.layer(layer, text + count)
            if layer + 1 < len(visual) and visual[layer + 1] < count:
                total += self.score(rows, text + count)
                if extra is not None:
                    total += extra[layer]
        return total


def pruning_extra(method: Any, visual: list[int], recycled: list[int], rows: int, channels: int) -> list[float] | None:
    """Per layer, the method's :meth:`~tokenprune.methods.vlm.VisualTokenMethod.pruning_flops` where it removes
    visual tokens (0 elsewhere): e.g. recycling's clustering products. None for a method without that hook (a
    ViT method inside the vision tower)."""
    if not hasattr(method, "pruning_flops"):
        return None
    return [
        method.pruning_flops(layer, visual, recycled, rows, channels)
        if layer + 1 < len(visual) and visual[layer + 1] < visual[layer]
        else 0.0
        for layer in range(len(visual))
    ]


def vit_tower_flops(tower: nn.Module, config: object) -> float:
    """One ``image_size`` image through a ViT-layout vision tower (CLIP, SigLIP, Idefics3, DINOv2)."""
    embeddings = getattr(tower, "vision_model", tower).embeddings  # CLIP / SigLIP layout, or the tower itself
    patch_embedding = next(m for m in embeddings.modules() if isinstance(m, nn.Conv2d))
    patches = (config.image_size // config.patch_size) ** 2
    # Prefix tokens: the class token and (DINOv2 with registers) register tokens.
    prefix = int(tower_has_class_token(tower)) + int(getattr(config, "num_register_tokens", 0) or 0)
    tokens = patches + prefix
    flops = 2.0 * patches * patch_embedding.weight.numel()
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for layer in tower_layers(tower):
        flops += 2.0 * tokens * linear_macs(layer)  # attention projections + MLP
        flops += 4.0 * tokens * tokens * heads * head_dim
    return flops


def tower_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a ViT-layout vision tower (CLIP/SigLIP ``encoder.layers``, DINOv2 ``encoder.layer``)."""
    vision = getattr(tower, "vision_model", tower)
    encoder = vision.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def tower_has_class_token(tower: nn.Module) -> bool:
    """Whether a ViT-layout tower prepends a class token (CLIP's class embedding, DINOv2's ``cls_token``)."""
    embeddings = getattr(tower, "vision_model", tower).embeddings
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")


def sample_table(flops: DecoderFlops, method: Any, state: Any, sample: int = 0) -> dict:
    """Analytic FLOPs of one sample of a prefill: reduction before the LLM and each LLM layer.

    Args:
        flops: The text model's per-layer FLOPs.
        method: The patch's :class:`~tokenprune.methods.vlm.VisualTokenMethod` (its ``merge_flops``).
        state: The prefill's :class:`~tokenprune.adapters.vlm.state.DecoderState`.
        sample: Which sample of the batch.

    Returns:
        ``{"merge", "layers": [{"layer", "tokens_in", "tokens_out", "flops", "method_flops"}]}``: the
        sample's own tokens (no padding or fill), ``method_flops`` the scoring at a removing layer.
    """
    plan, text, rows = state.plans[sample], state.text[sample], state.rows[sample]
    merge = sum(
        method.merge_flops(n, method.merged_count(n, plan.merge_keep), flops.hidden_size) for n in state.spans[sample]
    )
    visual = [counts[sample] for counts in state.targets_list]
    tokens_in = [text + count for count in visual]
    recycled = [0] * len(visual) if state.recycled_list is None else [r[sample] for r in state.recycled_list]
    extra = pruning_extra(method, visual, recycled, rows, flops.hidden_size)
    return {"merge": merge, "layers": flops.rows(tokens_in, tokens_in[1:] + tokens_in[-1:], rows, extra)}

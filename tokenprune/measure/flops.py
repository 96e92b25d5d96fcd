"""FLOPs, measured and analytic. Everywhere in tokenprune: FLOPs = 2 x multiply-accumulates (MAC).

Measured FLOPs come from ``torch.utils.flop_counter`` (matmuls, convolutions, attention), with one
addition: the CPU fused-attention kernel, which the stock counter does not know, is counted with the same
formula as the CUDA kernels. The analytic table counts the same operations per layer from module shapes
and the token counts of the forward, so the totals can be checked by hand and against each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from tokenprune import registry
from tokenprune.api import get_patch


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops


def measure_flops(fn, *args: Any, **kwargs: Any) -> int:
    """Total FLOPs (2 x MAC) of ``fn(*args, **kwargs)`` under ``torch.no_grad``."""
    # The counter's module tracker registers gradient hooks on module inputs that require grad and fails
    # on parameters expanded under no_grad (timm's attention-pool latent): freeze parameters meanwhile.
    frozen = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    for param in frozen:
        param.requires_grad_(False)
    try:
        with (
            torch.no_grad(),
            flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter,
        ):
            fn(*args, **kwargs)
    finally:
        for param in frozen:
            param.requires_grad_(True)
    return counter.get_total_flops()


@dataclass
class FlopsReport:
    """FLOPs of one forward, per image. FLOPs = 2 x MAC.

    Attributes:
        measured: From ``torch.utils.flop_counter`` (whole batch divided by batch size).
        analytic: Sum of the analytic table (None when no adapter knows the model).
        layers: Analytic rows: layer, tokens_in, tokens_out, flops, method_flops.
        embed: Analytic FLOPs before the first layer.
        head: Analytic FLOPs after the last layer.
        batch_size: Images in the measured batch.
    """

    measured: float
    analytic: float | None = None
    layers: list[dict] = field(default_factory=list)
    embed: float = 0.0
    head: float = 0.0
    batch_size: int = 1

    @property
    def gflops(self) -> float:
        """Measured GFLOPs per image."""
        return self.measured / 1e9

    def to_dict(self) -> dict:
        return {
            "flops_convention": "2 x MAC",
            "measured": self.measured,
            "analytic": self.analytic,
            "embed": self.embed,
            "head": self.head,
            "batch_size": self.batch_size,
            "layers": self.layers,
        }

    def table(self) -> str:
        """Markdown table of the analytic per-layer FLOPs."""
        lines = ["| layer | tokens in | tokens out | GFLOPs |", "|---|---|---|---|"]
        lines.append(f"| embed | | | {self.embed / 1e9:.4f} |")
        for row in self.layers:
            lines.append(f"| {row['layer']} | {row['tokens_in']} | {row['tokens_out']} | {row['flops'] / 1e9:.4f} |")
        lines.append(f"| head | | | {self.head / 1e9:.4f} |")
        analytic = "n/a" if self.analytic is None else f"{self.analytic / 1e9:.4f}"
        lines.append(f"| **total** | | | measured {self.gflops:.4f} / analytic {analytic} |")
        return "\n".join(lines)


def count_flops(model: nn.Module, example_input: torch.Tensor | Mapping[str, Any]) -> FlopsReport:
    """Measure FLOPs of ``model(example_input)`` and build the per-layer analytic table.

    Works on patched and unpatched models; for a patched one the analytic table follows the token counts
    that forward actually had (``patch.state.log``).

    Args:
        model: Any model; the analytic table needs a supported one.
        example_input: A batch, e.g. ``(B, 3, H, W)``, or a dict of keyword inputs (vision-language models:
            ``input_ids``, ``pixel_values``, ``attention_mask``), run as ``model(**example_input)``.

    Returns:
        A :class:`FlopsReport` with per-example figures (for a vision-language model, one prompt's prefill:
        vision tower + projector + LLM layers + LM head; the analytic table needs a batch of one prompt).
    """
    if isinstance(example_input, Mapping):
        return _count_flops_keyword(model, example_input)
    batch = example_input.shape[0]
    measured = measure_flops(model, example_input) / batch
    report = FlopsReport(measured=measured, batch_size=batch)
    patch = get_patch(model)
    try:
        adapter = patch.adapter if patch is not None else registry.find_adapter(model)(model)
    except TypeError:
        return report  # measured only: no adapter knows this model
    input_size = tuple(example_input.shape[-2:])
    method = None
    if patch is not None and patch.runtime.enabled and patch.state is not None:
        tokens = patch.state.tokens_per_layer()
        num_tokens = tokens[0][0]
        schedule = [tokens_in - tokens_out for tokens_in, tokens_out in tokens]
        method = patch.runtime.method
    else:
        num_tokens = adapter.num_tokens(input_size)
        schedule = [0] * adapter.depth
    table = adapter.analytic_flops(num_tokens, schedule, method)
    report.analytic = table["total"]
    report.layers = table["layers"]
    report.embed = table["embed"]
    report.head = table["head"]
    return report


def _count_flops_keyword(model: nn.Module, inputs: Mapping[str, Any]) -> FlopsReport:
    """``count_flops`` for models called with keyword inputs (vision-language models)."""
    first = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
    batch = first.shape[0]
    measured = measure_flops(model, **inputs) / batch
    report = FlopsReport(measured=measured, batch_size=batch)
    patch = get_patch(model)
    try:
        adapter = patch.adapter if patch is not None else registry.find_adapter(model)(model)
    except TypeError:
        return report
    if batch != 1 or adapter.kind != "vlm":
        return report  # per-sample token counts differ in a batch: measured only
    if patch is not None and patch.runtime.enabled:
        table = adapter.flops_for(patch.state, 0)
    else:  # unreduced: the adapter reads image counts and sizes from the inputs
        table = adapter.flops_for_inputs(inputs)
    report.analytic, report.layers = table["total"], table["layers"]
    report.embed, report.head = table["embed"], table["head"]
    return report

"""``tokenprune eval`` and ``tokenprune sweep``: accuracy, FLOPs and speed of reduced models, as JSON.

Accuracy comes from a labelled dataset when one is given (``--data`` or ``$TOKENPRUNE_DATA``); without
data the bundled example photos give agreement with the unreduced model instead. FLOPs are measured
(``torch.utils.flop_counter``, 2 x MAC) per image; images/s are measured patched vs unpatched side by
side on a synthetic batch, so the two share the machine's conditions.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune.api import apply
from tokenprune.measure.accuracy import (
    distributed_context,
    evaluate_agreement,
    evaluate_dataset,
    example_images,
)
from tokenprune.measure.bench import compare_throughput
from tokenprune.measure.flops import measure_flops


def resolve_data_root(data: str | os.PathLike[str] | None) -> str | None:
    """``--data`` if given, else ``$TOKENPRUNE_DATA``, else None (examples mode)."""
    return str(data) if data else os.environ.get("TOKENPRUNE_DATA") or None


def evaluate_setting(
    model: nn.Module,
    transform: Any,
    method: str,
    options: dict[str, Any],
    dataset: Any = None,
    batch_size: int = 32,
    bench_rounds: int = 3,
    progress: bool = True,
) -> dict:
    """Evaluate one method setting on an (unpatched) model; the model is unpatched again afterwards."""
    rank, world = distributed_context()
    img_size = model.patch_embed.img_size
    one_image = torch.zeros(1, 3, *img_size)
    base_flops = measure_flops(model, one_image)
    patch = apply(model, method, **options)
    try:
        reduced_flops = measure_flops(model, one_image)
        result: dict[str, Any] = {
            "method": method,
            "config": patch.config.to_dict(),
            "schedule": patch.schedule,
            "gflops_per_image": reduced_flops / 1e9,
            "gflops_per_image_unreduced": base_flops / 1e9,
            "flops_ratio": reduced_flops / base_flops,
            "world_size": world,
        }
        if dataset is not None:
            result.update(evaluate_dataset(model, dataset, batch_size=batch_size, progress=progress))
        else:
            result.update(evaluate_agreement(model, transform, example_images(), batch_size, progress))
    finally:
        patch.remove()
    if bench_rounds > 0 and rank == 0:
        images = torch.randn(batch_size, 3, *img_size, generator=torch.Generator().manual_seed(0))
        speed = compare_throughput(model, method, images, rounds=bench_rounds, progress=progress, **options)
        result.update({k: speed[k] for k in ("images_per_s_unpatched", "images_per_s_patched", "speedup")})
        result["speed_batch_size"] = batch_size
    return result


def sweep_settings(methods: Sequence[str], budgets: Sequence[float]) -> list[tuple[str, float]]:
    """(method, budget) pairs: ``none`` only at 1.0, reducing methods only below 1.0.

    Budget-major, in the order given: an interrupted sweep has compared every method at its first budgets.
    """
    pairs = []
    for budget in budgets:
        for method in methods:
            if (method == "none") == (budget >= 1.0):
                pairs.append((method, float(budget)))
    return pairs


def write_sweep_outputs(rows: list[dict], out_dir: Path, metric: str, title: str) -> None:
    """``sweep.json``, ``table.md`` and ``pareto.png`` (metric vs GFLOPs, a line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        f"| method | FLOPs budget | GFLOPs/img (measured) | FLOPs ratio | {metric} | img/s unpatched | img/s patched "
        "| speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['budget']} | n/a | n/a | {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['gflops_per_image']:.3f} | {row['flops_ratio']:.3f} "
            f"| {100 * row[metric]:.2f} | {row.get('images_per_s_unpatched', float('nan')):.1f} "
            f"| {row.get('images_per_s_patched', float('nan')):.1f} | {row.get('speedup', float('nan')):.2f}x |"
        )
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    reference = [row for row in rows if row["method"] == "none" and "error" not in row]
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted(
            (row["gflops_per_image"], 100 * row[metric])
            for row in rows + (reference if method != "none" else [])
            if "error" not in row and (row["method"] == method or row in reference)
        )
        if method == "none":
            axis.scatter(
                *zip(*points, strict=True), marker="*", s=160, color="black", label="none (unreduced)", zorder=3
            )
        else:
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set_xlabel("GFLOPs per image (measured, 2 x MAC)")
    axis.set_ylabel(f"{metric} (%)")
    axis.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)  # long data paths would be cut off
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(figure)

"""Benchmark: images/s of tome-patched vs unpatched timm ViTs at batch 32 on this CPU (issue: Core library).

Each row is measured side by side (interleaved unpatched/patched forwards, medians) in one run.
Writes eval/results/bench_vit_cpu.json and .md. Run: python eval/bench_vit.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import timm
import torch

from tokenprune.measure.bench import compare_throughput

RESULTS = Path(__file__).parent / "results"
# ToMe's own code on this CPU type, deit_small_patch16_224, batch 32 (from the issue): r -> speedup.
TOME_ANCHOR = {8: 1.45, 13: 1.77, 16: 2.00}
ROWS = [
    ("deit_small_patch16_224", {}, "tome", {"r": 8}),
    ("deit_small_patch16_224", {}, "tome", {"r": 13}),
    ("deit_small_patch16_224", {}, "tome", {"r": 16}),
    ("deit_small_patch16_224", {}, "tome", {"flops": 0.5}),
    ("vit_small_patch14_dinov2", {"img_size": 224}, "tome", {"flops": 0.5}),
    ("deit_small_patch16_224", {}, "evit", {"flops": 0.5}),
    ("deit_small_patch16_224", {}, "random", {"flops": 0.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    results = []
    for arch, kwargs, method, options in ROWS:
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, **kwargs).eval()
        size = model.patch_embed.img_size
        images = torch.randn(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
        row = compare_throughput(model, method, images, rounds=args.rounds, **options)
        row["model"] = arch
        if arch == "deit_small_patch16_224" and method == "tome" and "r" in options:
            row["tome_original_code_speedup"] = TOME_ANCHOR.get(options["r"])
        row["goal_speedup"] = 0.9 / row["flops_ratio"]
        results.append(row)
        print(f"{arch} {method} {options}: flops x{row['flops_ratio']:.3f} speedup {row['speedup']:.2f}x", flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "timm": timm.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_vit_cpu.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    lines = [
        "| model | method | setting | r per layer | FLOPs ratio | img/s unpatched | img/s patched | speedup "
        "| goal (0.9/ratio) | ToMe original code |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['model']} | {row['method']} | {row['options']} | {row['schedule']} | {row['flops_ratio']:.3f} "
            f"| {row['images_per_s_unpatched']:.1f} | {row['images_per_s_patched']:.1f} | {row['speedup']:.2f}x "
            f"| {row['goal_speedup']:.2f}x | {row.get('tome_original_code_speedup') or ''} |"
        )
    (RESULTS / "bench_vit_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

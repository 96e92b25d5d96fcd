"""Calibrated vs constant-rate schedules on vit-s14-imagenette: the goal table of issue 19.

For every method and FLOPs budget: the constant-rate schedule ``flops=`` solves, and the schedule
``tokenprune.calibrate`` fits on ``--calib-images`` class-balanced Imagenette *train* images (never val), both
scored on Imagenette val (``--limit`` for a subset) with measured GFLOPs and side-by-side images/s. One JSON per
setting under ``--out`` (resumable with ``--resume``), each calibrated schedule also as ``<method>_<budget>.json``
(a ``tokenprune calibrate`` file: ``load_set_file`` reads it), then ``table.md`` and ``summary.json`` with the
goals checked.

    TOKENPRUNE_DATA=/work/shared/datasets python eval/run_imagenette_calibrated.py --resume
    python eval/run_imagenette_calibrated.py --limit 32 --calib-images 8 --max-evals 4 --bench-rounds 0 --out /tmp/c

``--heldout N`` instead checks generalisation on train images only (no val): ``--calib-images`` + N class-balanced
train images, every k-th one calibrates, the other N score agreement / KL with the unreduced model
(``heldout_train_<budgets>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import tokenprune
from tokenprune import registry, zoo
from tokenprune.calibrate import calibrate_report, collect_images, divergence
from tokenprune.data import load_dataset
from tokenprune.measure.options import resolve_data_root
from tokenprune.measure.tasks.classification import build_model, evaluate_setting

MODEL = "vit-s14-imagenette"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="root holding imagenette/ (default: $TOKENPRUNE_DATA)")
    p.add_argument("--methods", default="tome,evit,pitome,ppt,random")
    p.add_argument("--flops", default="0.5,0.35,0.25", help="comma-separated budgets")
    p.add_argument("--calib-images", type=int, default=256, help="train images to calibrate on (<= 512)")
    p.add_argument("--max-evals", type=int, default=40, help="schedules scored per calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="val subset (class-balanced); default: all 3,925")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bench-rounds", type=int, default=2, help="side-by-side speed rounds (0: skip)")
    p.add_argument("--out", default="eval/results/imagenette_calibrated")
    p.add_argument("--resume", action="store_true", help="keep settings whose JSON is already in --out")
    p.add_argument(
        "--schedules",
        default="constant,calibrated",
        help="which schedules to run (none: only rewrite the table); the table also shows JSON already in --out",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--heldout", type=int, help="train-only check: score on N other train images (no val)")
    args = p.parse_args(argv)
    if not 1 <= args.calib_images <= 512:
        p.error("--calib-images must be in 1..512 (the issue's limit)")
    return args


def run_one(path: Path, resume: bool, compute) -> dict[str, Any]:
    if resume and path.exists():
        return json.loads(path.read_text())
    row = compute()
    path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = resolve_data_root(args.data)
    if root is None:
        raise SystemExit("needs the data: --data DIR or $TOKENPRUNE_DATA (a folder holding imagenette/)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    for method in methods:
        registry.get_method(method)  # unknown names fail before any work
    budgets = [float(b) for b in args.flops.split(",")]
    progress = not args.no_progress
    model, size = build_model(MODEL, None)
    transform = zoo.build_transform(size)
    if args.heldout:
        return heldout_check(model, transform, root, methods, budgets, args, out)
    train = load_dataset("imagenette", "train", root=root, transform=transform, limit=args.calib_images)
    val = load_dataset("imagenette", "val", root=root, transform=transform, limit=args.limit)
    calib = collect_images(torch.utils.data.DataLoader(train, batch_size=args.batch_size))
    common = dict(dataset=val, batch_size=args.batch_size, bench_rounds=args.bench_rounds, progress=progress)

    rows = [
        run_one(
            out / "none.json",
            args.resume,
            lambda: {"setting": "none", "budget": 1.0, **evaluate_setting(model, transform, "none", {}, **common)},
        )
    ]
    schedules = set(args.schedules.split(",")) - {"none"}  # none: only the table, from the JSON in --out
    if not schedules <= {"constant", "calibrated"}:
        raise SystemExit(f"--schedules: constant, calibrated, both (comma-separated) or none; got {args.schedules!r}")

    def add_row(name: str, schedule: str, compute) -> None:
        """Run the setting (or read it back with --resume); one not run now shows if its JSON is in --out."""
        if schedule in schedules or (out / name).is_file():
            rows.append(run_one(out / name, args.resume or schedule not in schedules, compute))

    for budget in budgets:
        for method in methods:
            add_row(
                f"{method}_constant_{budget}.json",
                "constant",
                lambda m=method, b=budget: {
                    "setting": "constant",
                    "budget": b,
                    **evaluate_setting(model, transform, m, {"flops": b}, **common),
                },
            )

            def calibrated(m: str = method, b: float = budget) -> dict[str, Any]:
                report = calibrate_report(
                    model, m, b, calib, args.seed, max_evals=args.max_evals, batch_size=args.batch_size,
                    progress=progress,
                )  # fmt: skip
                source = {"dataset": "imagenette", "split": "train", "limit": args.calib_images}
                schedule = {"model": MODEL, "calibrated_on": source, **report.to_dict()}
                (out / f"{m}_{b}.json").write_text(json.dumps(schedule, indent=2) + "\n")
                result = evaluate_setting(model, transform, m, report.config, **common)
                return {"setting": "calibrated", "budget": b, **result, "calibration": report.to_dict()}

            add_row(f"{method}_calibrated_{budget}.json", "calibrated", calibrated)
    summary = summarise(rows, methods, budgets)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(table(rows, summary, args))
    sys.stdout.write((out / "table.md").read_text())
    return 0


def heldout_check(model, transform, root: str, methods: list[str], budgets: list[float], args, out: Path) -> int:
    """Calibrate on every k-th of ``calib + heldout`` train images; agreement and KL on the others."""
    total = args.calib_images + args.heldout
    step = total // args.calib_images
    if step * args.calib_images != total:
        raise SystemExit("--heldout must be a multiple of --calib-images (every k-th image calibrates)")
    train = load_dataset("imagenette", "train", root=root, transform=transform, limit=total)
    images = collect_images(torch.utils.data.DataLoader(train, batch_size=args.batch_size))
    mask = torch.zeros(len(images), dtype=torch.bool)
    mask[::step] = True
    calib, held = images[mask], images[~mask]

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(held[i : i + args.batch_size]) for i in range(0, len(held), args.batch_size)])

    reference = logits()
    rows = {}
    for budget in budgets:
        for method in methods:
            report = calibrate_report(
                model, method, budget, calib, args.seed, max_evals=args.max_evals, batch_size=args.batch_size,
                progress=not args.no_progress,
            )  # fmt: skip
            row: dict[str, Any] = {"calibration": report.to_dict()}
            for name, options in (("constant", {"flops": budget}), ("calibrated", report.config)):
                patch = tokenprune.apply(model, method, **options)
                try:
                    reduced = logits()
                finally:
                    patch.remove()
                agree = float((reduced.argmax(-1) == reference.argmax(-1)).double().mean())
                row[name] = {"schedule": patch.schedule, "heldout_kl": divergence(reduced, reference, "kl"),
                             "heldout_agreement": agree}  # fmt: skip
            rows[f"{method}@{budget}"] = row
            sys.stdout.write(f"{method} {budget}: {json.dumps({k: row[k] for k in ('constant', 'calibrated')})}\n")
    meta = {"calib_images": len(calib), "heldout_images": len(held), "split": "train", "max_evals": args.max_evals}
    name = "heldout_train_" + "_".join(str(b) for b in budgets) + ".json"
    (out / name).write_text(json.dumps({**meta, "seed": args.seed, "rows": rows}, indent=2) + "\n")
    return 0


def summarise(rows: list[dict], methods: list[str], budgets: list[float]) -> dict[str, Any]:
    """The issue's goals, checked on these rows (points = top-1 percentage points)."""
    base = next(r for r in rows if r["setting"] == "none")["top1"]
    top1 = {(r["method"], r["setting"], r["budget"]): r["top1"] for r in rows if r["setting"] != "none"}
    goals = {0.5: 0.3, 0.35: 2.0, 0.25: 5.0}
    out: dict[str, Any] = {"unreduced_top1": base, "budgets": {}}
    for b in budgets:
        calibrated = {m: top1[(m, "calibrated", b)] for m in methods if (m, "calibrated", b) in top1}
        if not calibrated:  # only constant schedules ran at this budget
            continue
        best = max(calibrated, key=calibrated.get)
        entry = {
            "best_calibrated": best,
            "points_lost": 100 * (base - calibrated[best]),
            "goal_points_lost": goals.get(b),
            "calibrated_beats_constant": {
                m: calibrated[m] > top1[(m, "constant", b)] for m in calibrated if (m, "constant", b) in top1
            },
        }
        if "random" in methods:
            entry["beats_random"] = {
                setting: {
                    m: top1[(m, setting, b)] > top1[("random", setting, b)]
                    for m in methods
                    if m != "random" and (m, setting, b) in top1 and ("random", setting, b) in top1
                }
                for setting in ("constant", "calibrated")
            }
        if entry["goal_points_lost"] is not None:
            entry["goal_met"] = entry["points_lost"] <= entry["goal_points_lost"]
        out["budgets"][str(b)] = entry
    return out


def table(rows: list[dict], summary: dict, args: argparse.Namespace) -> str:
    lines = [
        f"vit-s14-imagenette, Imagenette val ({rows[0]['n']} images); calibrated on {args.calib_images} train images, "
        f"{args.max_evals} schedules scored per calibration, seed {args.seed}",
        "",
        "| method | budget | schedule | r per layer | GFLOPs/img | FLOPs ratio | top1 | Δ vs unreduced | KL on calib. "
        "images | img/s patched | speedup | goal 0.9/ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = summary["unreduced_top1"]
    for r in rows:
        cal = r.get("calibration")
        kl = f"{cal['constant_divergence']:.4f} -> {cal['divergence']:.4f}" if cal else ""
        speed = r.get("speedup")
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['setting']} | {r['schedule']} | {r['gflops_per_image']:.3f} | "
            f"{r['flops_ratio']:.3f} | {100 * r['top1']:.2f} | {100 * (r['top1'] - base):+.2f} | {kl} | "
            f"{r.get('images_per_s_patched', float('nan')):.1f} | "
            f"{'' if speed is None else f'{speed:.2f}x'} | {0.9 / r['flops_ratio']:.2f}x |"
        )
    lines += ["", "Goals:", "", "```json", json.dumps(summary, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

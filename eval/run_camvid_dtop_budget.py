"""dtop with a FLOPs budget vs tome with unmerging at equal GFLOPs on CamVid test (vit-s14-camvid).

For each saving (default 30% and 40%, i.e. ``flops=0.7`` and ``0.6``):

1. calibrate: ``tokenprune.calibrate_report(segmenter, "dtop", flops=f, images=train_images)`` on
   ``--calib-images`` CamVid **train** images (evenly spaced over the split; val and test are never seen), which
   picks the split of the exiting tokens across the two boundaries whose per-token class distributions stay
   nearest the unreduced model's (KL); written to ``calibration_flops<f>.json``;
2. test: the unreduced segmenter (once), dtop with the calibrated quota, dtop with ``flops=f`` (the default
   split: the same share of the live tokens exits at both boundaries) and tome at the FLOPs ratio the
   calibrated dtop measured (every original token takes its merged group's final feature), all on the 233
   test images with ``tokenprune.measure.tasks.segmentation.evaluate_segmenter``.

Each setting's JSON is kept, so a rerun resumes where it stopped; ``results.json`` and ``table.md`` are
rewritten from them at the end.

    OMP_NUM_THREADS=1 python eval/run_camvid_dtop_budget.py            # data: $TOKENPRUNE_DATA or ../shared/datasets
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import tokenprune
from tokenprune.calibrate import calibrate_report
from tokenprune.measure.tasks.segmentation import evaluate_segmenter
from tokenprune.zoo import camvid as seg

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("TOKENPRUNE_DATA", str(ROOT.parent / "shared" / "datasets")))
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "camvid_dtop_budget"))
    p.add_argument("--savings", default="0.3,0.4", help="FLOPs savings, comma-separated (flops = 1 - saving)")
    p.add_argument("--calib-images", type=int, default=96, help="train images the quota is calibrated on")
    p.add_argument("--max-evals", type=int, default=12, help="quotas scored per budget during calibration")
    p.add_argument("--keep-top-k", type=int, default=5)
    p.add_argument("--split", default="test", help="split the settings are scored on (never train)")
    p.add_argument("--limit", type=int, help="score the first LIMIT images only (smoke runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def cached(path: Path, compute) -> dict:
    """``path``'s JSON if a previous run wrote it, else ``compute()`` written there."""
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    row = compute()
    row["wall_seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return row


def main() -> None:
    args = parse()
    if args.split == "train":
        raise SystemExit("--split train is the calibration split; score on test (or val)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, transform = tokenprune.load_model("vit-s14-camvid")
    train = seg.CamVidDataset(args.data, "train", transform)
    picks = torch.linspace(0, len(train) - 1, args.calib_images).round().long().unique().tolist()
    scored = seg.CamVidDataset(args.data, args.split, transform, limit=args.limit)
    tag = f"_limit{args.limit}" if args.limit else ""
    meta = {"model": "vit-s14-camvid", "split": args.split, "images": len(scored)}

    def evaluate(method: str, options: dict) -> dict:
        row = evaluate_segmenter(model, scored, method, options, args.batch_size, progress=False)
        return {**meta, **row}

    rows = [{"setting": "-", **cached(out / f"none{tag}.json", lambda: evaluate("none", {}))}]
    for saving in [float(s) for s in args.savings.split(",")]:
        flops = round(1.0 - saving, 4)

        def calibrate(flops: float = flops) -> dict:
            calib = torch.stack([train[i][0] for i in picks])  # (N, 3, H, W)
            report = calibrate_report(
                model, "dtop", flops, calib, max_evals=args.max_evals, batch_size=args.batch_size,
                progress=False, keep_top_k=args.keep_top_k,
            )  # fmt: skip
            return {"calibrated_on": {"split": "train", "indices": picks}, **report.to_dict()}

        calibration = cached(out / f"calibration_flops{flops}.json", calibrate)
        config = calibration["config"]
        dtop = cached(out / f"dtop_calibrated_flops{flops}{tag}.json", lambda c=config: evaluate("dtop", c))
        rows.append({"setting": f"calibrated flops={flops}", "calibration": calibration, **dtop})
        default = {"flops": flops, "keep_top_k": args.keep_top_k}
        rows.append(
            {
                "setting": f"flops={flops}",
                **cached(out / f"dtop_flops{flops}{tag}.json", lambda d=default: evaluate("dtop", d)),
            }
        )
        match = round(dtop["flops_ratio"], 4)
        tome = cached(out / f"tome_flops{match}{tag}.json", lambda m=match: evaluate("tome", {"flops": m}))
        rows.append({"setting": f"flops={match} (= calibrated dtop)", "saving": saving, **tome})
        rows[-3]["saving"] = rows[-2]["saving"] = saving
    (out / f"results{tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"table{tag}.md").write_text(table(rows, args))
    print((out / f"table{tag}.md").read_text())


def table(rows: list[dict], args: argparse.Namespace) -> str:
    dense = rows[0]
    lines = [
        f"vit-s14-camvid, CamVid {args.split} ({dense['images']} images); dtop quotas calibrated on "
        f"{args.calib_images} train images (`eval/run_camvid_dtop_budget.py`).",
        "",
        "| saving | method | setting | exits per image after 4 / 8 blocks | GFLOPs/img (min-max) | vs unreduced "
        "| mIoU (%) | Δ mIoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        exits = ""
        if row["method"] == "dtop":
            fractions = list(row["token_exit_fraction"].values())[:-1]
            exits = " / ".join(f"{100 * f:.1f}%" for f in fractions)
        spread = row.get("gflops_per_image_min_max")
        gflops = f"{row['gflops_per_image']:.2f}" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        lines.append(f"| {100 * row['saving']:.0f}% | " if "saving" in row else "| - | ")
        lines[-1] += (
            f"{row['method']} | {row['setting']} | {exits} | {gflops} | {100 * (row['flops_ratio'] - 1):+.1f}% "
            f"| {100 * row['miou']:.2f} | {100 * (row['miou'] - dense['miou']):+.2f} |"
        )
    lines.append("")
    for saving in sorted({r["saving"] for r in rows if "saving" in r}):
        calibrated, _, tome = [r for r in rows if r.get("saving") == saving]
        verdict = "met" if calibrated["miou"] >= tome["miou"] else "missed"
        lines.append(
            f"- {100 * saving:.0f}% saving: calibrated dtop {100 * calibrated['miou']:.2f} at "
            f"{calibrated['gflops_per_image']:.2f} GFLOPs vs tome {100 * tome['miou']:.2f} at "
            f"{tome['gflops_per_image']:.2f}: goal (dtop >= tome) **{verdict}**"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

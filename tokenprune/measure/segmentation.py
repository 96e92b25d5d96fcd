"""``tokenprune eval | sweep --model vit-s14-camvid``: mIoU and GFLOPs of a (reduced) segmenter on CamVid.

Every setting is scored on the same split: mIoU over the 11 CamVid classes at label resolution (360x480,
logits upsampled bilinearly, void ignored), and GFLOPs per image (2 x MAC):

* ``gflops_per_image``: for ``dtop`` each image's own cost from its live-token counts, averaged over the
  images (the analytic count; ``flops_check`` re-measures the first images one by one with
  ``torch.utils.flop_counter`` and records the largest relative difference); for fixed-schedule methods
  the flop counter on one image.
* ``gflops_measured_batched``: the flop counter over the whole run divided by the images; for ``dtop`` this
  includes the padding of batches whose images keep different token counts.

``sweep``: ``dtop`` once per ``threshold`` in ``--set threshold=[...]``; ``tome``/``random``/... at the
``--flops`` budgets, or with ``--flops match`` at the FLOPs ratio each ``dtop`` setting of the same sweep
measured (so the baselines cost what ``dtop`` cost). Writes one JSON per setting, ``sweep.json``,
``table.md``, ``pareto.png`` and, per ``dtop`` threshold, ``exit_stages_<threshold>.png``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter
from tqdm.auto import tqdm

from tokenprune import segmentation as seg
from tokenprune.api import apply
from tokenprune.measure.flops import _EXTRA_FORMULAS, measure_flops

DEFAULT_SPLIT = "test"


def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of sweep-wide ``--set`` options that ``method``'s config accepts."""
    from tokenprune import registry

    fields = registry.get_method(method).config_cls.field_names()
    return {k: v for k, v in options.items() if k in fields}


@torch.no_grad()
def evaluate_segmenter(
    model: seg.ViTSegmenter,
    dataset: seg.CamVidDataset,
    method: str = "none",
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    flops_check_images: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """mIoU and GFLOPs of ``model`` reduced by ``method`` on ``dataset``; the model is unpatched afterwards."""
    options = dict(options or {})
    num_classes = model.num_classes
    one = dataset[0][0][None]
    dense_flops = measure_flops(model, one)
    patch = apply(model, method, **options)
    try:
        dtop = method == "dtop"
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        per_image_flops: list[float] = []
        stage_counts = torch.zeros(len(model.exit_after) + 1, dtype=torch.int64)
        counted, seconds = 0.0, 0.0
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
        for images, labels in tqdm(loader, desc=f"{method} {options}", unit="batch", disable=not progress):
            start = time.perf_counter()
            with flop_counter.FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
                logits = model(images)  # (B, K, h, w)
            seconds += time.perf_counter() - start
            counted += counter.get_total_flops()
            pred = seg.upsample_logits(logits, labels.shape[-2:]).argmax(1)
            confusion += seg.confusion_matrix(pred, labels, num_classes)
            if dtop:
                state = patch.state
                per_image_flops += patch.adapter.early_exit_flops(state).tolist()
                stage_counts += torch.bincount(state.exit_stage.flatten(), minlength=len(stage_counts))
        if dtop:
            check = []
            for i in range(min(flops_check_images, len(dataset))):
                measured = measure_flops(model, dataset[i][0][None])
                check.append(abs(measured - float(patch.adapter.early_exit_flops(patch.state)[0])) / measured)
            gflops = sum(per_image_flops) / len(per_image_flops) / 1e9
        else:
            gflops = measure_flops(model, one) / 1e9
        mean_iou, per_class = seg.miou(confusion)
        result: dict[str, Any] = {
            "method": method,
            "config": patch.config.to_dict(),
            "schedule": patch.schedule,
            "miou": mean_iou,
            "per_class_iou": dict(zip(seg.CAMVID_CLASSES, per_class, strict=True)),
            "images": len(dataset),
            "gflops_per_image": gflops,
            "gflops_measured_batched": counted / len(dataset) / 1e9,
            "gflops_per_image_unreduced": dense_flops / 1e9,
            "flops_ratio": gflops * 1e9 / dense_flops,
            "batch_size": batch_size,
            "seconds_forward": seconds,
            "images_per_s": len(dataset) / seconds,
        }
        if dtop:
            names = [f"after_{e}_blocks" for e in model.exit_after] + ["final_head"]
            total = int(stage_counts.sum())
            result["token_exit_fraction"] = {n: int(c) / total for n, c in zip(names, stage_counts, strict=True)}
            result["gflops_per_image_min_max"] = [min(per_image_flops) / 1e9, max(per_image_flops) / 1e9]
            result["flops_check"] = {"images": len(check), "max_rel_diff_measured_vs_analytic": max(check)}
    finally:
        patch.remove()
    return result


def plot_exit_stages(
    model: seg.ViTSegmenter, dataset: seg.CamVidDataset, indices: Sequence[int], options: dict[str, Any], path: Path
) -> None:
    """PNG: per image, the photo, ground truth, the ``dtop`` prediction and the stage each token exited at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    palette = torch.tensor(
        [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [0, 0, 192], [128, 128, 0],
         [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 0]]
    )  # fmt: skip  # CamVid colours, void black
    stages = len(model.exit_after) + 1
    stage_colours = ListedColormap(["#2b83ba", "#abdda4", "#fdae61", "#d7191c"][-stages:])
    patch = apply(model, "dtop", **options)
    try:
        figure, axes = plt.subplots(len(indices), 4, figsize=(13, 2.6 * len(indices)), squeeze=False)
        for row, index in enumerate(indices):
            image, label = dataset[index]
            with torch.no_grad():
                logits = model(image[None])
            pred = seg.upsample_logits(logits, label.shape).argmax(1)[0]
            stage_map = patch.state.exit_stage[0].reshape(model.grid_size)
            panels = [
                (dataset.load_image(index), dataset.names[index]),
                (palette[label.clamp(max=11)].numpy().astype("uint8"), "ground truth"),
                (palette[pred].numpy().astype("uint8"), f"dtop prediction ({options})"),
            ]
            for axis, (picture, title) in zip(axes[row], panels, strict=False):
                axis.imshow(picture)
                axis.set_title(title, fontsize=8)
                axis.axis("off")
            shown = axes[row, 3].imshow(stage_map.numpy(), cmap=stage_colours, vmin=-0.5, vmax=stages - 0.5)
            fraction = [(stage_map == s).float().mean().item() for s in range(stages)]
            axes[row, 3].set_title("exit stage " + " / ".join(f"{100 * f:.0f}%" for f in fraction), fontsize=8)
            axes[row, 3].axis("off")
        bar = figure.colorbar(shown, ax=axes[:, 3].tolist(), ticks=range(stages), fraction=0.05)
        bar.ax.set_yticklabels([f"after {e} blocks" for e in model.exit_after] + [f"final ({model.depth})"])
        figure.suptitle(f"{model.depth}-block ViT-S/14 on CamVid: where each token's prediction came from")
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=90)
        plt.close(figure)
    finally:
        patch.remove()


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    """``sweep.json``, ``table.md`` and ``pareto.png`` (mIoU vs GFLOPs per image, a line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"none": 0, "dtop": 1}
    rows = sorted(rows, key=lambda r: (order.get(r["method"], 2), r["method"], -r.get("gflops_per_image", 0.0)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    reference = next((r for r in rows if r["method"] == "none" and "error" not in r), None)
    lines = [
        "| method | setting | GFLOPs/img | vs unreduced | mIoU (%) | Δ mIoU | tokens exiting after 4 / 8 blocks "
        "| GFLOPs/img measured batched | img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['setting']} | n/a | | {row['error']} | | | | |")
            continue
        delta = f"{100 * (row['miou'] - reference['miou']):+.2f}" if reference else ""
        exits = row.get("token_exit_fraction")
        exits = " / ".join(f"{100 * v:.0f}%" for v in list(exits.values())[:-1]) if exits else ""
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['gflops_per_image']:.2f} | "
            f"{100 * (row['flops_ratio'] - 1):+.1f}% | {100 * row['miou']:.2f} | {delta} | {exits} | "
            f"{row['gflops_measured_batched']:.2f} | {row['images_per_s']:.2f} |"
        )
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["gflops_per_image"], 100 * r["miou"]) for r in rows if r["method"] == method and "miou" in r)
        if not points:
            continue
        if method == "none":
            axis.scatter(
                *zip(*points, strict=True), marker="*", s=160, color="black", label="none (unreduced)", zorder=3
            )
        else:
            axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set_xlabel("GFLOPs per image (2 x MAC)")
    axis.set_ylabel("mIoU (%)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(figure)


def _load(args: Any) -> tuple[seg.ViTSegmenter, seg.CamVidDataset, str]:
    from tokenprune import zoo

    model, transform = zoo.load_model(args.model, checkpoint=getattr(args, "checkpoint", None))
    split = getattr(args, "split", None) or DEFAULT_SPLIT
    dataset = seg.CamVidDataset(args.data, split, transform, limit=args.limit)
    return model, dataset, f"CamVid {split} ({len(dataset)} images)"


def cli_eval(args: Any) -> None:
    """``tokenprune eval --model vit-s14-camvid --method dtop --set threshold=0.95 [--split val]``."""
    from tokenprune.cli import method_options, model_label

    model, dataset, data = _load(args)
    result = evaluate_segmenter(model, dataset, args.method, method_options(args), args.batch_size)
    result.update({"model": model_label(args), "data": data, "limit": args.limit})
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")


def threshold_label(threshold: float | list[float]) -> str:
    """``0.95`` -> ``"0.95"``; per-stage ``[0.98, 0.9]`` -> ``"0.98-0.9"`` (file names and table rows)."""
    return "-".join(str(v) for v in threshold) if isinstance(threshold, list) else str(threshold)


def cli_sweep(args: Any) -> None:
    """``tokenprune sweep --model vit-s14-camvid --methods none,dtop,tome,random --set threshold=[0.9,0.95]
    --flops match --out DIR [--split val]``."""
    from tokenprune.cli import model_label, parse_set

    model, dataset, data = _load(args)
    out_dir = Path(args.out)
    methods = args.methods.split(",")
    options = parse_set(args.set or [])
    thresholds = options.pop("threshold", 0.95)
    thresholds = thresholds if isinstance(thresholds, list) else [thresholds]
    settings: list[tuple[str, str, dict[str, Any]]] = []  # (method, setting label, options)
    if "none" in methods:
        settings.append(("none", "-", {}))
    if "dtop" in methods:
        for threshold in thresholds:
            dtop_options = {**_options_for("dtop", options), "threshold": threshold}
            settings.append(("dtop", f"threshold={threshold_label(threshold)}", dtop_options))
    baselines = [m for m in methods if m not in ("none", "dtop")]
    match = args.flops.strip() == "match"
    budgets = [] if match else [float(b) for b in args.flops.split(",") if float(b) < 1.0]
    rows: dict[str, dict[str, Any]] = {}
    if args.resume:  # settings of earlier sweeps into the same folder stay in the table and plot
        rows = {p.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.name != "sweep.json"}

    def run(method: str, label: str, opts: dict[str, Any]) -> dict[str, Any]:
        path = out_dir / (f"{method}.json" if label == "-" else f"{method}_{label.replace('=', '')}.json")
        if args.resume and path.exists():
            row = json.loads(path.read_text())
        else:
            try:
                row = evaluate_segmenter(model, dataset, method, opts, args.batch_size)
            except ValueError as error:  # e.g. a budget this method cannot reach: recorded, not fatal
                row = {"method": method, "error": str(error)}
            row.update({"setting": label, "model": model_label(args), "data": data, "limit": args.limit})
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=2) + "\n")
        rows[path.name] = row
        write_outputs(list(rows.values()), out_dir, f"{args.model}: mIoU vs GFLOPs ({data})")
        return row

    for method, label, opts in tqdm(settings, desc="sweep (none, dtop)"):
        row = run(method, label, opts)
        if method == "dtop" and "error" not in row:
            image_path = out_dir / f"exit_stages_{threshold_label(opts['threshold'])}.png"
            if not (args.resume and image_path.exists()):
                plot_exit_stages(model, dataset, [0, len(dataset) // 3, 2 * len(dataset) // 3], opts, image_path)
            if match and row["flops_ratio"] < 1.0:  # a dtop setting that saved nothing has no baseline to match
                budgets.append(round(row["flops_ratio"], 4))
    # Highest budgets first: the settings that save least are the ones nearest an accuracy goal.
    for budget in tqdm(sorted(budgets, reverse=True), desc="sweep (baselines)"):
        for method in baselines:
            run(method, f"flops={budget}", {**_options_for(method, options), "flops": budget})
    sys.stdout.write((out_dir / "table.md").read_text())

"""Segmentation (``--model vit-s14-camvid``): mIoU and GFLOPs of a (reduced) segmenter on CamVid, or on the
user's ``images/`` + ``labels/`` folder (:class:`tokenprune.measure.layouts.SegmentationFolder`).

Every setting is scored on the same split: mIoU over the 11 CamVid classes at label resolution (360x480,
logits upsampled bilinearly, void ignored), and GFLOPs per image (2 x MAC):

* ``gflops_per_image``: for an early-exit method (``dtop``) each image's own cost from its live-token counts,
  averaged over the images (the analytic count; ``flops_check`` re-measures the first images one by one with
  ``torch.utils.flop_counter`` and records the largest relative difference); for fixed-schedule methods
  the flop counter on one image.
* ``gflops_measured_batched``: the flop counter over the whole run divided by the images; for ``dtop`` this
  includes the padding of batches whose images keep different token counts.

``sweep``: an early-exit method (a method for dense models only: ``dtop``) once per ``threshold`` in
``--set threshold=[...]``; the other methods (``tome``, ``random``, ...) at the ``--flops`` budgets, or with
``--flops match`` at the FLOPs ratio each early-exit setting of the same sweep measured (so the baselines cost
what it cost). Besides the outputs of every sweep, writes per threshold ``exit_stages_<threshold>.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter

from tokenprune import registry
from tokenprune.api import apply
from tokenprune.measure.flops import _EXTRA_FORMULAS, measure_flops
from tokenprune.measure.options import method_options, parse_set
from tokenprune.measure.tasks.base import Column, Loaded, PlotSpec, Setting, Task
from tokenprune.methods.dense import EarlyExitMethod
from tokenprune.methods.variants import is_control
from tokenprune.optional import require
from tokenprune.zoo import camvid as seg

DEFAULT_SPLIT = "test"
KIND = "dense"


def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of sweep-wide ``--set`` options that ``method``'s config accepts."""
    fields = registry.get_method(method).config_cls.field_names()
    return {k: v for k, v in options.items() if k in fields}


def seg_root(root: Path) -> bool:
    """``root`` is laid out as CamVid (``camvid/<split>/images`` or ``<split>/images``)."""
    try:
        seg.find_camvid(root)
    except FileNotFoundError:
        return False
    return True


def exits_early(method: str) -> bool:
    """An early-exit method (``EarlyExitMethod``): its cost differs per image."""
    return issubclass(registry.get_method(method).method_cls, EarlyExitMethod)


def early_exit_methods() -> list[str]:
    """The registered early-exit methods."""
    return [m for m in registry.methods(KIND) if exits_early(m)]


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
    tqdm = require("tqdm.auto", "eval", "progress bars").tqdm
    options = dict(options or {})
    num_classes = model.num_classes
    one = dataset[0][0][None]
    dense_flops = measure_flops(model, one)
    patch = apply(model, method, **options)
    try:
        dtop = exits_early(method)
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
    model: seg.ViTSegmenter,
    dataset: seg.CamVidDataset,
    indices: Sequence[int],
    options: dict[str, Any],
    path: Path,
    method: str | None = None,
) -> None:
    """PNG: per image, the photo, ground truth, the early-exit prediction and the stage each token exited at.

    ``method``: the early-exit method (default: the first registered one, ``dtop``).
    """
    method = method or early_exit_methods()[0]
    matplotlib = require("matplotlib", "eval", "exit-stage figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    palette = torch.tensor(
        [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [0, 0, 192], [128, 128, 0],
         [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 0]]
    )  # fmt: skip  # CamVid colours, void black
    stages = len(model.exit_after) + 1
    stage_colours = ListedColormap(["#2b83ba", "#abdda4", "#fdae61", "#d7191c"][-stages:])
    patch = apply(model, method, **options)
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
                (palette[pred].numpy().astype("uint8"), f"{method} prediction ({options})"),
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


def _row_exits(row: dict[str, Any]) -> str:
    exits = row.get("token_exit_fraction")
    return " / ".join(f"{100 * v:.0f}%" for v in list(exits.values())[:-1]) if exits else ""


def threshold_label(threshold: float | list[float]) -> str:
    """``0.95`` -> ``"0.95"``; per-stage ``[0.98, 0.9]`` -> ``"0.98-0.9"`` (file names and table rows)."""
    return "-".join(str(v) for v in threshold) if isinstance(threshold, list) else str(threshold)


class Segmentation(Task):
    """mIoU and GFLOPs per image of the CamVid segmenter: early exit vs token reduction at equal GFLOPs."""

    columns = [
        Column("method", lambda r: r["method"], lambda r: r["method"]),
        Column("setting", lambda r: r["setting"], lambda r: r["setting"]),
        Column("GFLOPs/img", lambda r: f"{r['gflops_per_image']:.2f}", lambda r: "n/a"),
        Column("vs unreduced", lambda r: f"{100 * (r['flops_ratio'] - 1):+.1f}%"),
        Column("mIoU (%)", lambda r: f"{100 * r['miou']:.2f}", lambda r: r["error"]),
        Column("Δ mIoU", lambda r: ""),  # vs the control's row of the same table: see table_columns
        Column("tokens exiting after 4 / 8 blocks", _row_exits),
        Column("GFLOPs/img measured batched", lambda r: f"{r['gflops_measured_batched']:.2f}"),
        Column("img/s", lambda r: f"{r['images_per_s']:.2f}"),
    ]
    plot = PlotSpec(
        x="gflops_per_image", y="miou", xlabel="GFLOPs per image (2 x MAC)", ylabel="mIoU (%)", title_size=9,
        through_control=False,
    )  # fmt: skip
    shares_folder = True  # eval/run_camvid_sweep.sh runs two test sweeps into one folder

    def table_columns(self, rows: list[dict[str, Any]]) -> list[Column]:
        reference = next((r for r in rows if is_control(r["method"]) and "error" not in r), None)
        delta = Column("Δ mIoU", lambda r: f"{100 * (r['miou'] - reference['miou']):+.2f}" if reference else "")
        return [delta if c.header == "Δ mIoU" else c for c in self.columns]

    def load(self, args: argparse.Namespace) -> Loaded:
        from tokenprune import zoo
        from tokenprune.measure.layouts import SegmentationFolder

        model, transform = zoo.load_model(args.model, checkpoint=getattr(args, "checkpoint", None))
        root = Path(args.data).expanduser() if args.data else None
        if root is not None and ((root / "images").is_dir() or not seg_root(root)):  # the user's own images/labels
            dataset = SegmentationFolder(root, transform, limit=args.limit)
            return Loaded(model, dataset, f"{root} ({len(dataset)} images)")
        split = getattr(args, "split", None) or DEFAULT_SPLIT
        dataset = seg.CamVidDataset(args.data, split, transform, limit=args.limit)
        return Loaded(model, dataset, f"CamVid {split} ({len(dataset)} images)")

    def eval_setting(self, args: argparse.Namespace) -> Setting:
        return Setting(args.method, method_options(args))

    def settings(self, loaded: Loaded, args: argparse.Namespace, done: Mapping[str, dict]) -> Iterator[Setting]:
        names = args.methods.split(",") if args.methods else registry.methods(KIND)
        options = parse_set(args.set or [])
        thresholds = options.pop("threshold", 0.95)
        thresholds = thresholds if isinstance(thresholds, list) else [thresholds]
        for name in filter(is_control, names):
            yield Setting(name, {}, f"{name}.json", {"setting": "-"})
        exiting = []
        for name in filter(exits_early, names):
            for threshold in thresholds:
                label = threshold_label(threshold)
                exiting.append(
                    Setting(name, {**_options_for(name, options), "threshold": threshold},
                            f"{name}_threshold{label}.json", {"setting": f"threshold={label}"})
                )  # fmt: skip
        yield from exiting
        baselines = [n for n in names if not is_control(n) and not exits_early(n)]
        match = args.flops.strip() == "match"
        budgets = [] if match else [float(b) for b in args.flops.split(",") if float(b) < 1.0]
        if match:  # an early-exit setting that saved nothing has no baseline to match
            rows = [done[s.file] for s in exiting if "error" not in done[s.file]]
            budgets = [round(row["flops_ratio"], 4) for row in rows if row["flops_ratio"] < 1.0]
        # Highest budgets first: the settings that save least are the ones nearest an accuracy goal.
        for budget in sorted(budgets, reverse=True):
            for name in baselines:
                yield Setting(name, {**_options_for(name, options), "flops": budget}, f"{name}_flops{budget}.json",
                              {"setting": f"flops={budget}"})  # fmt: skip

    def evaluate(self, loaded: Loaded, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
        return evaluate_segmenter(loaded.model, loaded.data, setting.method, setting.options, args.batch_size)

    def after(self, loaded: Loaded, setting: Setting, row: dict[str, Any], args: argparse.Namespace) -> None:
        if not exits_early(setting.method) or "error" in row:
            return
        dataset = loaded.data
        path = Path(args.out) / f"exit_stages_{threshold_label(setting.options['threshold'])}.png"
        if not (args.resume and path.exists()):
            indices = [0, len(dataset) // 3, 2 * len(dataset) // 3]
            plot_exit_stages(loaded.model, dataset, indices, setting.options, path, setting.method)

    def order(self, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
        """The control, the early-exit settings, then the baselines; by method, most GFLOPs first."""

        def rank(method: str) -> int:
            return 0 if is_control(method) else 1 if exits_early(method) else 2

        return sorted(rows, key=lambda r: (rank(r["method"]), r["method"], -r.get("gflops_per_image", 0.0)))

    def title(self, args: argparse.Namespace, loaded: Loaded) -> str:
        return f"{args.model}: mIoU vs GFLOPs ({loaded.description})"


TASK = Segmentation()


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    """``sweep.json``, ``table.md`` and ``pareto.png`` of segmentation results (any order)."""
    from tokenprune.measure.sweep import write_outputs as write

    write(TASK, TASK.order(rows, argparse.Namespace()), out_dir, title)

"""Classification: top-1 accuracy (or agreement), GFLOPs and images/s of a reduced ViT classifier.

Accuracy comes from a labelled dataset when one is given (``--data`` or ``$TOKENPRUNE_DATA``); without data the
bundled example photos give agreement with the unreduced model instead. FLOPs are measured
(``torch.utils.flop_counter``, 2 x MAC) per image; images/s are measured patched vs unpatched side by side on a
synthetic batch, so the two share the machine's conditions. Models: see :mod:`tokenprune.measure.models` (a zoo
classifier, ``timm:<arch>`` with ``--checkpoint``, a random-weight timm architecture for speed and FLOPs, a local
Hugging Face classifier); data: the zoo's ``<root>/<dataset>/val`` layout or any ImageFolder
(:class:`tokenprune.measure.layouts.ImageFolder`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenprune import registry
from tokenprune.api import apply
from tokenprune.measure.accuracy import distributed_context, evaluate_agreement, evaluate_dataset, example_images
from tokenprune.measure.bench import compare_throughput
from tokenprune.measure.flops import measure_flops
from tokenprune.measure.models import load_classifier, parse_model
from tokenprune.measure.options import method_options, parse_set, resolve_data_root
from tokenprune.measure.tasks.base import Column, Loaded, PlotSpec, Setting, Task, budget_settings
from tokenprune.methods.variants import is_control, resolve

KIND = "vit"


def build_model(
    name: str, img_size: int | None, checkpoint: str | None = None, allow_download: bool = False
) -> tuple[nn.Module, int]:
    """A classifier by ``--model`` value (:mod:`tokenprune.measure.models`) and its input side.

    ``checkpoint`` replaces a zoo model's shipped weights, or loads a ``timm:<arch>`` state dict.
    """
    loaded = load_classifier(parse_model(name, allow_download), img_size, checkpoint)
    return loaded.model, loaded.input_size[0]


def evaluate_setting(
    model: nn.Module,
    transform: Any,
    method: str,
    options: dict[str, Any],
    dataset: Any = None,
    batch_size: int = 32,
    bench_rounds: int = 3,
    progress: bool = True,
    input_size: tuple[int, int] | None = None,
) -> dict:
    """Evaluate one method setting on an (unpatched) model; the model is unpatched again afterwards.

    ``input_size``: (H, W) of the model's input (default: timm's ``patch_embed.img_size``).
    """
    rank, world = distributed_context()
    img_size = tuple(input_size or model.patch_embed.img_size)
    one_image = torch.zeros(1, 3, *img_size)
    base_flops = measure_flops(model, one_image)
    dynamic = [getattr(m, "dynamic_img_size", False) for m in (model, getattr(model, "patch_embed", None))]
    if options.get("flops") is not None and any(dynamic):
        options = {"input_size": list(img_size), **options}  # the budget is solved for the size scored here
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


def _named_layout(root: Path, dataset: str) -> bool:
    """``root`` holds ``<dataset>/val`` (or is ``<dataset>``): the zoo's own layout, not a plain ImageFolder."""
    return (root / dataset).is_dir() or (root.name == dataset and (root / "val").is_dir())


def _num_logits(model: nn.Module) -> int | None:
    """Outputs of a classifier (timm ``num_classes`` / HF ``config.num_labels``), None when unknown."""
    return getattr(model, "num_classes", None) or getattr(getattr(model, "config", None), "num_labels", None)


def _metric(row: dict[str, Any]) -> str:
    return "top1" if "top1" in row else "top1_agreement"


def _metric_of(rows: list[dict[str, Any]]) -> str:
    """``top1`` on a labelled dataset, ``top1_agreement`` on the example photos."""
    return "top1" if any("top1" in row for row in rows) or not rows else _metric(next(iter(rows)))


def _nan(row: dict[str, Any], key: str) -> float:
    return row.get(key, float("nan"))


class Classification(Task):
    """Accuracy (or agreement with the unreduced model), GFLOPs and images/s of a ViT classifier."""

    columns = [
        Column("method", lambda r: r["method"], lambda r: r["method"]),
        Column("FLOPs budget", lambda r: f"{r['budget']}", lambda r: f"{r['budget']}"),
        Column("GFLOPs/img (measured)", lambda r: f"{r['gflops_per_image']:.3f}", lambda r: "n/a"),
        Column("FLOPs ratio", lambda r: f"{r['flops_ratio']:.3f}", lambda r: "n/a"),
        Column("{metric}", lambda r: f"{100 * r[_metric(r)]:.2f}", lambda r: r["error"]),
        Column("img/s unpatched", lambda r: f"{_nan(r, 'images_per_s_unpatched'):.1f}"),
        Column("img/s patched", lambda r: f"{_nan(r, 'images_per_s_patched'):.1f}"),
        Column("speedup", lambda r: f"{_nan(r, 'speedup'):.2f}x"),
    ]
    plot = PlotSpec(
        x="gflops_per_image", y="{metric}", xlabel="GFLOPs per image (measured, 2 x MAC)", ylabel="{metric} (%)",
        wrap=60,
    )  # fmt: skip

    def table_columns(self, rows: list[dict[str, Any]]) -> list[Column]:
        metric = _metric_of(rows)
        return [dataclasses.replace(c, header=c.header.format(metric=metric)) for c in self.columns]

    def plot_spec(self, rows: list[dict[str, Any]]) -> PlotSpec:
        metric = _metric_of(rows)
        return dataclasses.replace(self.plot, y=metric, ylabel=self.plot.ylabel.format(metric=metric))

    def load(self, args: argparse.Namespace) -> Loaded:
        from tokenprune import zoo
        from tokenprune.data import DatasetLayoutError, expected_layout, load_dataset
        from tokenprune.measure.layouts import ImageFolder, read_labels_file

        if getattr(args, "split", None) not in (None, "val"):
            raise SystemExit(f"classifiers are scored on their val split; --split {args.split!r} is not supported")
        spec = parse_model(args.model, getattr(args, "allow_download", False))
        loaded = load_classifier(spec, args.img_size, args.checkpoint)
        extra = {"tf": loaded.transform, "input_size": loaded.input_size}
        root = resolve_data_root(args.data)
        if root is None:
            return Loaded(loaded.model, None, "bundled example photos (agreement with the unreduced model)", extra)
        if spec.source == "timm" and not args.checkpoint:
            raise SystemExit(
                f"{args.model} has random weights: accuracy on a dataset needs trained weights (a zoo classifier "
                f"{zoo.classifiers()}, timm:<arch> --checkpoint FILE, or a Hugging Face classifier directory)"
            )
        limit = f", limit {args.limit}" if args.limit else ""
        entry = zoo.get_entry(args.model) if spec.source == "zoo" else None
        if entry is not None and not getattr(args, "labels", None) and _named_layout(Path(root), entry.dataset):
            dataset = load_dataset(entry.dataset, "val", root=root, transform=loaded.transform, limit=args.limit)
            return Loaded(loaded.model, dataset, f"{entry.dataset} val at {root}{limit}", extra)
        labels = getattr(args, "labels", None)
        labels = [["folders"]] if labels == "folders" else read_labels_file(labels) if labels else loaded.labels
        try:
            dataset = ImageFolder(root, loaded.transform, labels, _num_logits(loaded.model), args.limit)
        except DatasetLayoutError as error:
            if entry is None:
                raise
            named = expected_layout(entry.dataset, root)
            raise DatasetLayoutError(f"{error}\nor the zoo's own layout for {args.model}:\n{named}") from None
        return Loaded(loaded.model, dataset, f"ImageFolder {root} ({len(dataset.classes)} classes{limit})", extra)

    def eval_setting(self, args: argparse.Namespace) -> Setting:
        method, variant = resolve(args.method, KIND)  # an unknown name fails here, with the valid ones listed
        return Setting(method, {**variant.options, **method_options(args)})

    def settings(self, loaded: Loaded, args: argparse.Namespace, done: Mapping[str, dict]) -> Iterator[Setting]:
        names = args.methods.split(",") if args.methods else default_methods(KIND)
        args.methods = ",".join(names)
        fixed = parse_set(args.set or [])
        yield from budget_settings(names, [float(b) for b in args.flops.split(",")],
                                   lambda name, budget: {**fixed, "flops": budget})  # fmt: skip

    def evaluate(self, loaded: Loaded, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
        return evaluate_setting(
            loaded.model, loaded.extra["tf"], setting.method, setting.options, loaded.data, args.batch_size,
            args.bench_rounds, input_size=loaded.extra.get("input_size"),
        )  # fmt: skip

    def title(self, args: argparse.Namespace, loaded: Loaded) -> str:
        metric = "top1" if loaded.data is not None else "top1_agreement"
        return f"{args.model}: {metric} vs FLOPs ({loaded.description})"


def default_methods(kind: str) -> list[str]:
    """Every method registered for ``kind``: the control first, then the others sorted."""
    names = registry.methods(kind)
    return [n for n in names if is_control(n)] + [n for n in names if not is_control(n)]


TASK = Classification()

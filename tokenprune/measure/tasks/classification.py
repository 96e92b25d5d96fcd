"""Classification: top-1 accuracy (or agreement), GFLOPs and images/s of a reduced ViT classifier.

Accuracy comes from a labelled dataset when one is given (``--data`` or ``$TOKENPRUNE_DATA``); without data the
bundled example photos give agreement with the unreduced model instead. FLOPs are measured
(``torch.utils.flop_counter``, 2 x MAC) per image; images/s are measured patched vs unpatched side by side on a
synthetic batch, so the two share the machine's conditions. Models: a zoo classifier, else a timm architecture
with random weights (enough for speed and FLOPs).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tokenprune import registry
from tokenprune.api import apply
from tokenprune.measure.accuracy import distributed_context, evaluate_agreement, evaluate_dataset, example_images
from tokenprune.measure.bench import compare_throughput
from tokenprune.measure.flops import measure_flops
from tokenprune.measure.options import method_options, parse_set, resolve_data_root
from tokenprune.measure.tasks.base import Column, Loaded, PlotSpec, Setting, Task, budget_settings
from tokenprune.methods.variants import is_control

KIND = "vit"


def build_model(name: str, img_size: int | None, checkpoint: str | None = None) -> tuple[nn.Module, int]:
    """A model by zoo name, else a timm architecture with random weights (enough for speed and FLOPs).

    ``checkpoint`` replaces a zoo model's shipped weights (e.g. a file just written by its training script).
    """
    from tokenprune import zoo

    if name in zoo.classifiers():
        model, _ = zoo.load_model(name, checkpoint=checkpoint)
        return model.eval(), img_size or 224
    if checkpoint is not None:
        raise SystemExit(f"--checkpoint applies to zoo models ({zoo.available_models()}), not to {name!r}")
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise SystemExit(
            f"unknown model {name!r}: not a tokenprune zoo name nor a timm architecture ({error})"
        ) from error
    size = img_size or model.patch_embed.img_size[0]
    return model.eval(), size


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
        from tokenprune.data import load_dataset

        if getattr(args, "split", None) not in (None, "val"):
            raise SystemExit(f"classifiers are scored on their val split; --split {args.split!r} is not supported")
        model, size = build_model(args.model, args.img_size, args.checkpoint)
        transform = zoo.build_transform(size)
        root = resolve_data_root(args.data)
        if root is None:
            return Loaded(model, None, "bundled example photos (agreement with the unreduced model)", {"tf": transform})
        if args.model not in zoo.classifiers():
            raise SystemExit(
                f"accuracy on a dataset needs a trained zoo model ({zoo.classifiers()}), got {args.model!r}"
            )
        entry = zoo.get_entry(args.model)
        dataset = load_dataset(entry.dataset, "val", root=root, transform=transform, limit=args.limit)
        limit = f", limit {args.limit}" if args.limit else ""
        return Loaded(model, dataset, f"{entry.dataset} val at {root}{limit}", {"tf": transform})

    def eval_setting(self, args: argparse.Namespace) -> Setting:
        return Setting(args.method, method_options(args))

    def settings(self, loaded: Loaded, args: argparse.Namespace, done: Mapping[str, dict]) -> Iterator[Setting]:
        names = args.methods.split(",") if args.methods else default_methods(KIND)
        args.methods = ",".join(names)
        fixed = parse_set(args.set or [])
        yield from budget_settings(names, [float(b) for b in args.flops.split(",")],
                                   lambda name, budget: {**fixed, "flops": budget})  # fmt: skip

    def evaluate(self, loaded: Loaded, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
        return evaluate_setting(
            loaded.model, loaded.extra["tf"], setting.method, setting.options, loaded.data, args.batch_size,
            args.bench_rounds,
        )  # fmt: skip

    def title(self, args: argparse.Namespace, loaded: Loaded) -> str:
        metric = "top1" if loaded.data is not None else "top1_agreement"
        return f"{args.model}: {metric} vs FLOPs ({loaded.description})"


def default_methods(kind: str) -> list[str]:
    """Every method registered for ``kind``: the control first, then the others sorted."""
    names = registry.methods(kind)
    return [n for n in names if is_control(n)] + [n for n in names if not is_control(n)]


TASK = Classification()

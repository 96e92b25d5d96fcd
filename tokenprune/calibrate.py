"""``tokenprune.calibrate``: a per-layer schedule at a FLOPs budget, fitted on the user's own images.

>>> config = tokenprune.calibrate(model, "tome", flops=0.35, images=train_images)  # {"r": [...], ...}
>>> patch = tokenprune.apply(model, "tome", **config)

A constant per-layer rate (what ``flops=`` solves) leaves few tokens in the last layers at small budgets.
:func:`calibrate` searches schedules of the same FLOPs (within ``tolerance``; the analytic count the library
uses everywhere) for the one whose outputs diverge least from the unreduced model's on the given images: the
KL divergence of the class distributions for classifiers, the relative squared error of the pooled features for
backbones without a head. The search (:mod:`tokenprune.core.calibrate`) is seeded and runs a bounded number of
evaluations; the images are the only data it sees. The config it returns is plain JSON and goes to
``tokenprune.apply`` as it is; :func:`add_calibrate_command` / :func:`load_set_file` are the command line's
``calibrate`` subcommand and ``--set-file``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenprune import registry
from tokenprune.api import apply, get_patch
from tokenprune.core.calibrate import ScheduleSpace, search_schedule


@dataclass
class Calibration:
    """What :func:`calibrate_report` found.

    Attributes:
        method: The method calibrated.
        config: Options for ``tokenprune.apply(model, method, **config)`` (plain JSON).
        flops: The budget asked for.
        flops_ratio: Analytic FLOPs of the calibrated schedule relative to the unreduced model.
        constant_schedule: The constant-rate schedule ``flops=`` gives.
        constant_flops_ratio: Its analytic FLOPs ratio.
        divergence: Objective of the calibrated schedule on the calibration images.
        constant_divergence: Objective of the constant schedule on the same images.
        objective: ``"kl"`` (classifier logits) or ``"feature"`` (relative squared error of pooled features).
        images: Calibration images used.
        evaluations: Schedules scored.
        seed: Seed of the search.
    """

    method: str
    config: dict[str, Any]
    flops: float
    flops_ratio: float
    constant_schedule: list[int]
    constant_flops_ratio: float
    divergence: float
    constant_divergence: float
    objective: str
    images: int
    evaluations: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return asdict(self)


def calibrate(
    model: nn.Module, method: str, flops: float = 0.35, images: Any = None, seed: int = 0, **kwargs: Any
) -> dict[str, Any]:
    """The config (``{"r": [...], ...}``) of the schedule at ``flops`` that best preserves ``model``'s outputs.

    Args:
        model: An unpatched ViT (timm ``VisionTransformer`` or a Hugging Face encoder), in eval mode.
        method: A registered ViT method (``tokenprune.methods(kind="vit")``).
        flops: FLOPs budget, fraction of the unreduced model in (0, 1].
        images: The calibration images: a ``(N, 3, H, W)`` tensor, or an iterable (e.g. a ``DataLoader``) of
            such batches or of ``(images, labels)`` pairs.
        seed: Seed of the search.
        **kwargs: :func:`calibrate_report`'s keyword options and the method's fixed options.

    Returns:
        Options for ``tokenprune.apply(model, method, **config)``.
    """
    return calibrate_report(model, method, flops, images, seed, **kwargs).config


def calibrate_report(
    model: nn.Module,
    method: str,
    flops: float = 0.35,
    images: Any = None,
    seed: int = 0,
    *,
    max_evals: int = 48,
    batch_size: int = 32,
    limit: int | None = None,
    tolerance: float = 0.005,
    progress: bool = True,
    **options: Any,
) -> Calibration:
    """:func:`calibrate`, returning the :class:`Calibration` (config, divergences before and after, FLOPs).

    Args:
        model: An unpatched ViT in eval mode.
        method: A registered ViT method.
        flops: FLOPs budget in (0, 1].
        images: Tensor ``(N, 3, H, W)`` or an iterable of batches / ``(images, labels)`` pairs.
        seed: Seed of the search.
        max_evals: Schedules scored at most (each one forward over the images).
        batch_size: Images per forward.
        limit: Use the first ``limit`` images only.
        tolerance: Analytic FLOPs within ``tolerance * flops`` of the budget.
        progress: Show a tqdm bar.
        **options: Fixed method options (e.g. ``prop_attn=False``); not ``r`` or ``flops``.

    Raises:
        ValueError: Bad budget (outside (0, 1] or below what the method reaches), no images, a method that
            reduces nothing or is not a ViT method, ``r``/``flops`` among the options.
        TypeError: Images of the wrong type or shape, a model no ViT adapter supports.
        RuntimeError: The model is already patched.
    """
    budget = getattr(registry.get_method(method).method_cls, "calibrate_budget", None)
    if budget is not None:  # a method with its own budget search (dtop: per-stage exit quotas of a segmenter)
        if get_patch(model) is not None:
            raise RuntimeError(f"model is already patched with {get_patch(model).method!r}; call patch.remove() first")
        return budget(
            model, flops, collect_images(images, limit), seed, max_evals=max_evals, batch_size=batch_size,
            progress=progress, **options,
        )  # fmt: skip
    entry = _check_method(method, options)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0.0 < float(flops) <= 1.0:
        raise ValueError(f"flops budget must be a number in (0, 1] (fraction of the unreduced FLOPs), got {flops!r}")
    if get_patch(model) is not None:
        raise RuntimeError(f"model is already patched with {get_patch(model).method!r}; call patch.remove() first")
    batch = collect_images(images, limit)
    adapter = registry.find_adapter(model)(model)
    if adapter.kind != "vit":
        raise TypeError(f"calibrate tunes ViT token schedules; {type(model).__name__} is a {adapter.kind!r} model")
    options = dict(options)
    size = tuple(batch.shape[-2:])
    if not adapter.has_static_size:
        given = options.setdefault("input_size", list(size))
        if tuple([given] * 2 if isinstance(given, int) else given) != size:
            raise ValueError(f"input_size={given} does not match the calibration images ({size[0]}x{size[1]})")
    with torch.no_grad():
        reference, kind = _readout(model, adapter, batch, batch_size, None)
    patch = apply(model, method, flops=float(flops), **options)  # the constant solution, and a clear budget error
    try:
        method_impl, config = patch.runtime.method, patch.config
        num_tokens = patch.adapter.num_tokens(config.input_size)
        space = ScheduleSpace(
            patch.adapter.depth,
            num_tokens,
            patch.adapter.num_protected,
            method_impl.max_removable,
            lambda s: patch.adapter.analytic_flops(num_tokens, s, method_impl)["total"],
        )
    finally:
        patch.remove()

    def objective(schedule: list[int]) -> float:
        trial = apply(model, method, r=list(schedule), **options)
        try:
            with torch.no_grad():
                reduced, _ = _readout(model, adapter, batch, batch_size, trial)
        finally:
            trial.remove()
        return divergence(reduced, reference, kind)

    bar = None
    if progress:
        from tokenprune.optional import require

        tqdm = require("tqdm.auto", "eval", "progress bars").tqdm
        bar = tqdm(total=max_evals, desc=f"calibrate {method} flops={flops}", unit="schedule")

    def on_eval(best: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{best:.4g}")

    try:
        result = search_schedule(space, float(flops), objective, max_evals, tolerance, seed, on_eval=on_eval)
    finally:
        if bar is not None:
            bar.close()
    config = {**options, "r": result.schedule}
    entry.config_cls.from_dict(config)  # the returned config is one apply() takes
    return Calibration(
        method=method,
        config=json.loads(json.dumps(config)),
        flops=float(flops),
        flops_ratio=space.ratio(result.schedule),
        constant_schedule=result.start,
        constant_flops_ratio=space.ratio(result.start),
        divergence=result.value,
        constant_divergence=result.start_value,
        objective=kind,
        images=int(batch.shape[0]),
        evaluations=result.evaluations,
        seed=seed,
    )


def _check_method(method: str, options: Mapping[str, Any]) -> registry.MethodEntry:
    entry = registry.get_method(method)
    vit = registry.methods("vit")
    if "vit" not in entry.kinds:
        raise ValueError(f"method {method!r} does not reduce ViT tokens; calibrate takes one of {vit}")
    if entry.method_cls.control or entry.example == entry.identity:
        reducing = [m for m in vit if m != method and not registry.get_method(m).method_cls.control]
        raise ValueError(f"method {method!r} removes no tokens: nothing to calibrate; methods that do: {reducing}")
    fixed = sorted({"r", "flops"} & set(options))
    if fixed:
        raise ValueError(f"calibrate chooses the schedule itself: drop {fixed} from the options")
    return entry


def collect_images(images: Any, limit: int | None = None) -> torch.Tensor:
    """The calibration images as one ``(N, C, H, W)`` tensor.

    Args:
        images: A tensor, or an iterable of tensors or of ``(images, ...)`` tuples/lists.
        limit: Keep the first ``limit`` images (>= 1).

    Raises:
        ValueError: No images, or ``limit < 1``.
        TypeError: Not images (not 4-D tensors of one size).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 image, got {limit}")
    if images is None:
        raise ValueError("calibrate needs images: a (N, 3, H, W) tensor or a DataLoader of a few hundred images")
    if isinstance(images, torch.Tensor):
        chunks = [images]
    elif isinstance(images, Iterable):
        chunks, count = [], 0
        for item in images:
            chunk = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(chunk, torch.Tensor):
                raise TypeError(f"calibration batches must be image tensors (or (images, labels)), got {type(chunk)}")
            chunks.append(chunk)
            count += chunk.shape[0] if chunk.dim() == 4 else 0
            if limit is not None and count >= limit:
                break
    else:
        raise TypeError(f"images must be a (N, 3, H, W) tensor or an iterable of batches, got {type(images).__name__}")
    if any(chunk.dim() != 4 for chunk in chunks):
        raise TypeError(f"calibration images must be (N, C, H, W) batches, got shapes {[c.shape for c in chunks]}")
    if len({tuple(c.shape[1:]) for c in chunks}) > 1:
        raise TypeError("calibration batches must share one image size")
    batch = torch.cat(chunks) if chunks else torch.empty(0)
    if batch.shape[0] == 0:
        raise ValueError("calibrate got an empty image set; give at least one image (a few hundred is typical)")
    return batch[:limit] if limit is not None else batch


def _readout(
    model: nn.Module, adapter: Any, images: torch.Tensor, batch_size: int, patch: Any
) -> tuple[torch.Tensor, str]:
    """Model outputs compared by the objective: ``(logits, "kl")`` or ``(pooled features, "feature")``."""
    outputs, kind = [], "feature"
    for start in range(0, images.shape[0], batch_size):
        out = model(images[start : start + batch_size])
        tensor, kind = _output_tensor(model, adapter, out, patch)
        outputs.append(tensor.float())
    return torch.cat(outputs), kind


def _output_tensor(model: nn.Module, adapter: Any, out: Any, patch: Any) -> tuple[torch.Tensor, str]:
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits, "kl"
    if isinstance(out, torch.Tensor):
        if out.dim() == 2:
            return out, "kl" if getattr(model, "num_classes", 0) else "feature"
        hidden = out  # timm with global_pool="": every token
    else:
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled, "feature"
        hidden = out.last_hidden_state
    # A token sequence: the class token where there is one, else the size-weighted mean of the tokens.
    if adapter.has_class_token:
        return hidden[:, 0], "feature"
    tokens = hidden[:, adapter.num_protected :]
    size = torch.ones_like(tokens[..., :1])
    if patch is not None and patch.state is not None and patch.state.num_tokens == hidden.shape[1]:
        size = patch.state.size[:, adapter.num_protected :].to(tokens.dtype)
    return (tokens * size).sum(dim=1) / size.sum(dim=1), "feature"


def divergence(reduced: torch.Tensor, reference: torch.Tensor, kind: str) -> float:
    """Mean over images of ``KL(p_reference || p_reduced)`` (``"kl"``) or ``|f - f_ref|^2 / |f_ref|^2``."""
    reduced, reference = reduced.double(), reference.double()
    if kind == "kl":
        return float(
            F.kl_div(reduced.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean")
        )
    error = (reduced - reference).pow(2).sum(-1) / reference.pow(2).sum(-1).clamp_min(1e-12)
    return float(error.mean())


# ----------------------------------------------------------------- command line and set files
def add_calibrate_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tokenprune calibrate`` to the CLI's subparsers (``sub = parser.add_subparsers(...)``)."""
    p = subparsers.add_parser("calibrate", help="fit a per-layer schedule at a FLOPs budget on your own images")
    p.add_argument("--model", required=True, help="zoo classifier (e.g. vit-s14-imagenette)")
    p.add_argument("--method", default="tome", help=f"a ViT method: {registry.methods('vit')}")
    p.add_argument("--flops", type=float, default=0.35, help="FLOPs budget, fraction of the unreduced model")
    p.add_argument("--data", help="dataset root holding <dataset>/<split>/... (default: $TOKENPRUNE_DATA)")
    p.add_argument("--split", default="train", help="split the images come from (default: train; never tune on val)")
    p.add_argument("--limit", type=int, default=256, help="calibration images (class-balanced, deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-evals", type=int, default=48, help="schedules scored at most")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed method option, repeatable")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--checkpoint", help="zoo models: calibrate this checkpoint instead of the shipped one")
    p.add_argument("--out", required=True, help="schedule JSON to write (read back with --set-file)")
    p.add_argument("--json", action="store_true", help="print the written JSON on stdout instead of the table")
    p.set_defaults(func=run_calibrate)
    return p


def run_calibrate(args: argparse.Namespace) -> Calibration:
    """Run ``tokenprune calibrate``: calibrate on ``--limit`` images of ``--split``, write ``--out``."""
    from tokenprune import zoo
    from tokenprune.data import load_dataset
    from tokenprune.measure.options import parse_set, resolve_data_root, write_json
    from tokenprune.measure.tasks.classification import build_model

    if args.model not in zoo.classifiers():
        raise SystemExit(f"calibrate needs a zoo classifier and its dataset ({zoo.classifiers()}), got {args.model!r}")
    root = resolve_data_root(args.data)
    if root is None:
        raise SystemExit("calibrate needs images: --data DIR (or $TOKENPRUNE_DATA) holding the model's dataset")
    model, size = build_model(args.model, args.img_size, args.checkpoint)
    entry = zoo.get_entry(args.model)
    dataset = load_dataset(entry.dataset, args.split, root=root, transform=zoo.build_transform(size), limit=args.limit)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)
    report = calibrate_report(
        model, args.method, args.flops, loader, args.seed, max_evals=args.max_evals, batch_size=args.batch_size,
        **parse_set(args.set or []),
    )  # fmt: skip
    source = {"dataset": entry.dataset, "split": args.split, "limit": args.limit}
    saved = {"model": args.model, "calibrated_on": source, **report.to_dict()}
    write_json(saved, args.out)
    sys.stdout.write(json.dumps(saved, indent=2) + "\n" if args.json else summary_table(report, args.out))
    return report


def summary_table(report: Calibration, out: str | os.PathLike[str]) -> str:
    """The calibrated schedule against the constant one, as a Markdown table (what ``tokenprune calibrate`` prints)."""
    calibrated = report.config.get("r", report.config)
    rows = [
        ("constant (`flops=`)", report.constant_schedule, report.constant_flops_ratio, report.constant_divergence),
        ("calibrated", calibrated, report.flops_ratio, report.divergence),
    ]
    lines = [
        f"{report.method} at flops={report.flops}: {report.evaluations} schedules scored on {report.images} images "
        f"(seed {report.seed}); objective: {report.objective}",
        "",
        f"| schedule | per layer | FLOPs ratio | {report.objective} on the calibration images |",
        "|---|---|---|---|",
        *(f"| {name} | {schedule} | {ratio:.3f} | {value:.4f} |" for name, schedule, ratio, value in rows),
        "",
        f"written: {out} (pass it as --set-file to tokenprune eval or sweep)",
    ]
    return "\n".join(lines) + "\n"


def load_set_file(path: str | os.PathLike[str], method: str | None = None) -> dict[str, Any]:
    """Method options from a JSON file: a ``tokenprune calibrate --out`` file or a plain ``{option: value}`` object.

    Args:
        path: The file.
        method: The method the options will go to; a calibrate file made for another method is refused.

    Raises:
        ValueError: Not a JSON object, or calibrated for another method.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a set file holds a JSON object of method options, got {type(data).__name__}")
    if "config" in data and "method" in data:
        if method is not None and data["method"] != method:
            raise ValueError(f"{path} was calibrated for method {data['method']!r}, not {method!r}")
        return dict(data["config"])
    return data

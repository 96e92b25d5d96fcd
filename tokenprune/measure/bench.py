"""Throughput benchmarks: patched vs unpatched, interleaved in one run so machine noise hits both alike."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenprune.api import apply
from tokenprune.measure.flops import measure_flops
from tokenprune.optional import require

tqdm = require("tqdm.auto", "eval", "progress bars").tqdm


def call(model: nn.Module, inputs: torch.Tensor | Mapping[str, Any]) -> Any:
    """``model(inputs)`` for a tensor batch, ``model(**inputs)`` for keyword inputs (vision-language models)."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def time_call(model: nn.Module, inputs: torch.Tensor | Mapping[str, Any]) -> float:
    """Wall seconds of one forward."""
    start = time.perf_counter()
    call(model, inputs)
    return time.perf_counter() - start


class ModuleTimer:
    """Wall seconds spent inside one module's forward (e.g. the language model of a VLM), per call.

    Register it before applying a patch so that work a patch does in its own pre-hook on that module (AIM's
    merging before the LLM) falls inside. ``seconds`` holds the last call, ``total`` the sum since creation.
    """

    def __init__(self, module: nn.Module) -> None:
        self.seconds = 0.0
        self.total = 0.0
        self._start = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: Any) -> None:
        self.seconds = time.perf_counter() - self._start
        self.total += self.seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def compare_throughput(
    model: nn.Module,
    method: str,
    images: torch.Tensor,
    rounds: int = 5,
    warmup: int = 1,
    progress: bool = True,
    **options: Any,
) -> dict:
    """Images/s of ``model`` unpatched and patched with ``method(**options)``, measured alternately.

    Each round times one unpatched and one patched forward of the whole batch (the patch is applied and
    removed around its forward, so "unpatched" is the original model). Medians over rounds are reported,
    and the speedup is the ratio of the medians.

    Args:
        model: An eval-mode supported model.
        method: Method name.
        images: One batch ``(B, 3, H, W)``.
        rounds: Timed rounds (each: one unpatched + one patched forward).
        warmup: Untimed rounds first.
        progress: Show a tqdm bar.
        **options: Method options (``r=...`` or ``flops=...``).

    Returns:
        A JSON-ready dict with FLOPs per image, images/s and the speedup.
    """
    batch = images.shape[0]
    base_flops = measure_flops(model, images[:1])
    patch = apply(model, method, **options)
    schedule = patch.schedule
    reduced_flops = measure_flops(model, images[:1])
    patch.remove()
    times: dict[str, list[float]] = {"unpatched": [], "patched": []}
    with torch.inference_mode():
        for step in tqdm(range(warmup + rounds), desc=f"bench {method} {options}", disable=not progress):
            unpatched = time_call(model, images)
            patch = apply(model, method, **options)
            patched = time_call(model, images)
            patch.remove()
            if step >= warmup:
                times["unpatched"].append(unpatched)
                times["patched"].append(patched)
    median_unpatched = statistics.median(times["unpatched"])
    median_patched = statistics.median(times["patched"])
    return {
        "method": method,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "schedule": schedule,
        "batch_size": batch,
        "input_size": list(images.shape[-2:]),
        "threads": torch.get_num_threads(),
        "gflops_per_image_unpatched": base_flops / 1e9,
        "gflops_per_image_patched": reduced_flops / 1e9,
        "flops_ratio": reduced_flops / base_flops,
        "images_per_s_unpatched": batch / median_unpatched,
        "images_per_s_patched": batch / median_patched,
        "speedup": median_unpatched / median_patched,
        "seconds_unpatched": times["unpatched"],
        "seconds_patched": times["patched"],
    }


def bench_command(args: argparse.Namespace) -> dict[str, Any]:
    """``tokenprune bench``: ``--model`` patched vs unpatched, side by side (JSON in ``--out``, a table on stdout).

    Vision-language models: generation metrics (:mod:`tokenprune.measure.generation`); image models: images/s
    on a seeded random batch.
    """
    from tokenprune.measure.models import parse_model
    from tokenprune.measure.options import emit, method_options, runs, setting_label
    from tokenprune.measure.tasks.classification import build_model

    task = parse_model(args.model, getattr(args, "allow_download", False)).task
    if task == "vqa":
        from tokenprune.measure.generation import bench_generation_command

        return bench_generation_command(args)
    if task != "classification":
        raise SystemExit(f"tokenprune bench takes classifiers and VLMs; {args.model} is a {task} model: its eval "
                         "reports images/s (tokenprune eval)")  # fmt: skip
    model, size = build_model(args.model, args.img_size, getattr(args, "checkpoint", None))
    batch = args.batch_size or 32
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    options = method_options(args)
    result = compare_throughput(model, args.method, images, rounds=args.rounds, **options)
    result["model"] = args.model
    emit(result, args, throughput_table(result, setting_label(args.method, options), runs(result["schedule"] or [])))
    return result


def throughput_table(result: dict[str, Any], setting: str, schedule: str) -> str:
    """A :func:`compare_throughput` result as a one-row markdown table."""
    header = "| setting | GFLOPs/img unpatched / patched | img/s unpatched / patched | speedup | schedule |"
    row = (
        f"| {setting} | {result['gflops_per_image_unpatched']:.3f} / {result['gflops_per_image_patched']:.3f} | "
        f"{result['images_per_s_unpatched']:.1f} / {result['images_per_s_patched']:.1f} | {result['speedup']:.2f}x | "
        f"{schedule or '-'} |"
    )
    return f"{header}\n|---|---|---|---|---|\n{row}\n"

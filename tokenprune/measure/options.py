"""Command-line values the eval harness shares: ``--set`` options, the model label results are filed under."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``["r=8", "prop_attn=false", "r=[1,2]"]`` -> options; values are JSON where they parse, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method options from ``--set-file`` (if given), ``--set`` on top, plus the ``--flops`` shortcut."""
    options = {}
    if getattr(args, "set_file", None):
        from tokenprune.calibrate import load_set_file

        options = load_set_file(args.set_file, getattr(args, "method", None))
    options.update(parse_set(args.set or []))
    if getattr(args, "flops", None) is not None:
        options["flops"] = args.flops
    return options


def model_label(args: argparse.Namespace) -> str:
    """The model name results are filed under; names the checkpoint when it is not the shipped one."""
    checkpoint = getattr(args, "checkpoint", None)
    return args.model if checkpoint is None else f"{args.model} @ {checkpoint}"


def resolve_data_root(data: str | os.PathLike[str] | None) -> str | None:
    """``--data`` if given, else ``$TOKENPRUNE_DATA``, else None (examples mode)."""
    return str(data) if data else os.environ.get("TOKENPRUNE_DATA") or None


def write_json(data: Any, out: str | os.PathLike[str] | None, stdout: bool = True) -> None:
    """JSON to ``out`` when given, and to stdout when ``stdout``."""
    text = json.dumps(data, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    if stdout:
        sys.stdout.write(text + "\n")


def emit(result: dict[str, Any], args: argparse.Namespace, table: str) -> None:
    """A command's result: the full JSON into ``--out``; on stdout the JSON with ``--json``, else ``table``."""
    as_json = bool(getattr(args, "json", False))
    write_json(result, getattr(args, "out", None), stdout=as_json)
    if not as_json:
        sys.stdout.write(table)


def runs(values: Sequence[Any]) -> str:
    """``[8, 8, 8, 0]`` -> ``"8x3 0"``: a per-layer list on one line."""
    groups = [(json.dumps(value), len(list(group))) for value, group in itertools.groupby(values)]
    return " ".join(text if count == 1 else f"{text}x{count}" for text, count in groups)


def _cell(row: dict[str, Any], *keys: str, scale: float = 1.0, fmt: str = "{:.3f}") -> str | None:
    if not all(isinstance(row.get(k), (int, float)) for k in keys):
        return None
    return " / ".join(fmt.format(scale * row[k]) for k in keys)


def summary_table(result: dict[str, Any], setting: str) -> str:
    """One eval result as a short markdown table: setting, accuracy, GFLOPs, speed, schedule (one line each)."""
    accuracy = next(
        (f"{k} {100 * result[k]:.2f}%" for k in ("top1", "top1_agreement", "miou", "accuracy") if k in result), "n/a"
    )
    if "vqa_accuracy" in result:
        accuracy += f" (VQA soft {100 * result['vqa_accuracy']:.2f}%)"
    count = next((result[k] for k in ("n", "images", "questions") if k in result), None)
    accuracy += f" on {count}" if count is not None else ""
    gflops = _cell(result, "gflops_per_image", "gflops_per_image_unreduced") or _cell(
        result, "gflops_total", "gflops_total_unreduced"
    )
    ratio = result.get("flops_ratio", result.get("llm_flops_ratio"))
    gflops = f"{gflops} ({'LLM ' if 'llm_flops_ratio' in result else ''}ratio {ratio:.3f})" if gflops else "n/a"
    speed = _cell(result, "images_per_s_unpatched", "images_per_s_patched", fmt="{:.1f}")
    if speed:
        speed = f"{speed} img/s ({result['speedup']:.2f}x)"
    elif _cell(result, "prefill_ms_total_unpatched"):
        speed = _cell(result, "prefill_ms_total_unpatched", "prefill_ms_total_patched", fmt="{:.1f}")
        speed = f"prefill {speed} ms ({result['prefill_speedup_total']:.2f}x)"
    elif "images_per_s" in result:
        speed = f"{result['images_per_s']:.2f} img/s (patched)"
    if result.get("schedule"):
        schedule = "merged per layer: " + runs(result["schedule"])
    elif result.get("tokens_per_layer_first_prompt"):
        schedule = "tokens per layer: " + runs([t[0] for t in result["tokens_per_layer_first_prompt"]])
    elif result.get("token_exit_fraction"):
        schedule = "exits: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["token_exit_fraction"].items())
    else:
        schedule = "-"
    header = ["setting", "accuracy", "GFLOPs reduced / unreduced", "speed unpatched / patched", "schedule"]
    cells = [setting, accuracy, gflops, speed or "n/a (--bench-rounds 0)", schedule]
    return "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n| " + " | ".join(cells) + " |\n"


def setting_label(method: str, options: dict[str, Any]) -> str:
    """``"tome flops=0.5 r=8"``: a method and its options on one line."""
    return " ".join([method, *(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items())])

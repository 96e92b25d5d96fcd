"""Command-line values the eval harness shares: ``--set`` options, the model label results are filed under."""

from __future__ import annotations

import argparse
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
    """Method options from ``--set`` plus the ``--flops`` shortcut."""
    options = parse_set(args.set or [])
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


def write_json(data: Any, out: str | os.PathLike[str] | None) -> None:
    """JSON to stdout, and to ``out`` too when given."""
    text = json.dumps(data, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.write(text + "\n")

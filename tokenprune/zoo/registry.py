"""The zoo's registry: one :class:`ZooEntry` per reference model, whatever its task.

Each model's module (``imagenette.py``, ``camvid.py``, ``easyvqa.py``) registers its entry; the entry names the
loader (``"module:function"``, imported only when the model is loaded, so ``import tokenprune`` stays light) and
the task that scores it (``tokenprune.measure.tasks.<task>``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Where the shipped checkpoints live (package data).
CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"

_REGISTRY: dict[str, ZooEntry] = {}


@dataclass(frozen=True)
class ZooEntry:
    """One registered reference model.

    Attributes:
        name: Registry name (``load_model(name)``, ``tokenprune eval --model name``).
        task: The eval task that scores it: ``"classification"``, ``"segmentation"``, ``"vqa"`` (a module of
            ``tokenprune.measure.tasks``).
        description: One line for listings.
        loader: ``"module:function"``; the function takes ``checkpoint=None`` and returns what ``load_model``
            returns for this model (``(model, transform)`` or ``(model, processor)``).
        checkpoint: File (or directory) name under ``tokenprune/checkpoints/``.
        train_command: How the checkpoint is reproduced (shown when it is missing).
        dataset: Classifiers: the dataset name in ``tokenprune.data`` it was trained on.
        wnids: Classifiers: class folder names in label order.
        class_names: Classifiers: human-readable names in label order.
        img_size: Classifiers: input height = width in pixels.
        max_new_tokens: VQA models: tokens a greedy answer takes at most, ``</s>`` included.
    """

    name: str
    task: str
    description: str
    loader: str
    checkpoint: str = ""
    train_command: str = ""
    dataset: str = ""
    wnids: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    img_size: int = 224
    max_new_tokens: int = 0


def register_model(entry: ZooEntry) -> None:
    """Adds a model to the zoo.

    Raises:
        ValueError: The name is taken.
    """
    if entry.name in _REGISTRY:
        raise ValueError(f"model name {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry


def available_models() -> list[str]:
    """Names accepted by ``load_model``, sorted (every task)."""
    return sorted(_REGISTRY)


def classifiers() -> list[str]:
    """Names of the registered image classifiers, sorted."""
    return sorted(name for name, entry in _REGISTRY.items() if entry.task == "classification")


def get_entry(name: str) -> ZooEntry:
    """The registry entry of ``name``.

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}") from None


def task_of(name: str) -> str:
    """The task of model ``name`` (``"classification"``, ``"segmentation"``, ``"vqa"``, ...).

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    return get_entry(name).task


def class_names(name: str) -> list[str]:
    """Human-readable class names of classifier ``name``, in logit order."""
    entry = get_entry(name)
    if entry.task != "classification":
        raise ValueError(f"{name!r} is a {entry.task} model, not an image classifier")
    return list(entry.class_names)


def checkpoint_path(name: str) -> Path:
    """Where the shipped checkpoint of model ``name`` lives (it may not exist yet)."""
    return CHECKPOINT_DIR / get_entry(name).checkpoint


def load_model(name: str, checkpoint: str | os.PathLike[str] | None = None) -> Any:
    """Builds a registered model with its trained weights, in eval mode (float32).

    Args:
        name: One of ``available_models()``.
        checkpoint: Use this checkpoint instead of the shipped one (e.g. a freshly trained file).

    Returns:
        What the model's loader returns: ``(model, transform)`` for image models, ``(model, processor)`` for
        vision-language models.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
        FileNotFoundError: The checkpoint does not exist (the message says how it is made).
        tokenprune.zoo.ZooError: The checkpoint does not fit the model.
    """
    module, _, function = get_entry(name).loader.partition(":")
    return getattr(importlib.import_module(module), function)(checkpoint=checkpoint)

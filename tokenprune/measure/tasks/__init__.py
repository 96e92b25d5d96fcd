"""Eval tasks, one module each (``classification``, ``segmentation``, ``vqa``), each defining ``TASK``.

A zoo model names its task (``ZooEntry.task``); a timm architecture is a classifier; a Hugging Face model's
config says which it is (:func:`tokenprune.measure.models.parse_model`). A new task is one module here.
"""

from __future__ import annotations

import importlib

from tokenprune.measure.tasks.base import Column, Loaded, PlotSpec, Setting, Task


def task_for(model: str, allow_download: bool = False) -> Task:
    """The task that scores ``--model model`` (see :mod:`tokenprune.measure.models`)."""
    from tokenprune.measure.models import parse_model

    name = parse_model(model, allow_download).task
    return importlib.import_module(f"tokenprune.measure.tasks.{name}").TASK


__all__ = ["Column", "Loaded", "PlotSpec", "Setting", "Task", "task_for"]

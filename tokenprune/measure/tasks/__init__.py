"""Eval tasks, one module each (``classification``, ``segmentation``, ``vqa``), each defining ``TASK``.

A zoo model names its task (``ZooEntry.task``); any other model name is a timm architecture, a classifier.
A new task is one module here.
"""

from __future__ import annotations

import importlib

from tokenprune.measure.tasks.base import Column, Loaded, PlotSpec, Setting, Task


def task_for(model: str) -> Task:
    """The task that scores ``model`` (zoo name, else a timm architecture: classification)."""
    from tokenprune import zoo

    name = zoo.task_of(model) if model in zoo.available_models() else "classification"
    return importlib.import_module(f"tokenprune.measure.tasks.{name}").TASK


__all__ = ["Column", "Loaded", "PlotSpec", "Setting", "Task", "task_for"]

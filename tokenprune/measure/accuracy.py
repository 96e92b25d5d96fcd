"""Accuracy of a (reduced) classifier: on a labelled dataset, or agreement with the unreduced model.

Runs on one process or, launched with ``torchrun --nproc-per-node N``, on N processes (gloo): each rank
evaluates every N-th image and the counts are summed with ``all_reduce``.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from tokenprune.api import disabled
from tokenprune.optional import require

tqdm = require("tqdm.auto", "eval", "progress bars").tqdm

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"


def example_images() -> list[Path]:
    """The bundled freely licensed photos (see ``assets/examples/NOTICE.md``)."""
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """An RGB PIL image; an unreadable file raises ``ValueError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)``; starts a gloo process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        # A process that exits with a live gloo group can abort in its teardown ("terminate called without an
        # active exception"): every rank waits for the others, then the group is destroyed, before exit.
        atexit.register(_end_process_group)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _end_process_group() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _sum_across_ranks(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a classifier's output: a tensor (timm) or an HF output with ``.logits``."""
    return output.logits if hasattr(output, "logits") else output


def _batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module, dataset: Any, batch_size: int = 32, progress: bool = True, num_workers: int = 0
) -> dict:
    """Top-1 accuracy of ``model`` (as it is, patched or not) on a labelled map-style dataset.

    Returns:
        ``{"top1": ..., "correct": ..., "n": ...}`` summed over all ranks.
    """
    rank, world = distributed_context()
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    correct = 0
    seen = 0
    for images, labels in tqdm(loader, desc="eval", disable=not progress or rank != 0):
        predictions = logits_of(model(images)).argmax(dim=-1)
        correct += int((predictions == labels).sum())
        seen += len(labels)
    correct, seen = _sum_across_ranks([correct, seen])
    return {"top1": correct / seen if seen else float("nan"), "correct": int(correct), "n": int(seen)}


@torch.no_grad()
def evaluate_agreement(
    model: nn.Module,
    transform: Callable[[Image.Image], torch.Tensor],
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Agreement of the patched ``model`` with its unreduced self on unlabelled images.

    Returns:
        ``{"top1_agreement", "feature_cosine" (mean over images of pre-logit features; of the logits for
        models without timm's ``forward_head``), "n"}``.
    """
    agree = 0.0
    cosine = 0.0
    for chunk in tqdm(_batches(list(paths), batch_size), desc="agreement", disable=not progress):
        images = torch.stack([transform(load_image(p)) for p in chunk])
        reduced_features, reduced_logits = _features_and_logits(model, images)
        with disabled(model):
            full_features, full_logits = _features_and_logits(model, images)
        agree += float((reduced_logits.argmax(-1) == full_logits.argmax(-1)).sum())
        cosine += float(F.cosine_similarity(reduced_features, full_features, dim=-1).sum())
    n = len(paths)
    return {"top1_agreement": agree / n, "feature_cosine": cosine / n, "n": n}


def _features_and_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm: pre-logit features and logits; other classifiers (HF): the logits twice."""
    if hasattr(model, "forward_head"):
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        return features, model.head(features)
    logits = logits_of(model(images))
    return logits, logits

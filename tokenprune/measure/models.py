"""``--model`` values: which model to load, what task scores it, and the loading itself (nothing downloads).

``--model`` takes, in this order of precedence:

* a zoo name (``tokenprune.available_models()``), optionally with ``--checkpoint`` (the zoo's own format);
* ``timm:<architecture>``, with ``--checkpoint FILE`` (safetensors, or a torch file read with
  ``weights_only=True``) holding the model's state dict; without it, random weights (speed and FLOPs only);
* a bare timm architecture name (random weights, as before);
* a local Hugging Face directory (``config.json`` + weights): an image classifier
  (``*ForImageClassification``) or a vision-language model (``AutoModelForImageTextToText``), loaded with
  ``local_files_only=True``;
* a hub id (``org/name``): loaded from the local Hugging Face cache only, unless ``--allow-download``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TIMM_PREFIX = "timm:"
#: Keys a training script commonly nests a state dict under.
_NESTED = ("state_dict", "model", "model_state_dict", "module")
VALID_MODELS = (
    "a zoo name ({zoo}), timm:<architecture> [--checkpoint FILE], a timm architecture, a local Hugging Face "
    "directory (config.json + weights), or a hub id already in the local Hugging Face cache"
)


@dataclass
class ModelSpec:
    """What a ``--model`` value names, before anything is loaded.

    Attributes:
        source: ``"zoo"``, ``"timm"`` or ``"hf"``.
        task: The eval task: ``"classification"``, ``"segmentation"`` or ``"vqa"``.
        name: The zoo name, timm architecture, or the local directory of an HF model.
        label: How results are filed (the ``--model`` value as given).
        config: The HF config (``source == "hf"``).
    """

    source: str
    task: str
    name: str
    label: str
    config: Any = None


@dataclass
class LoadedModel:
    """A loaded model and what feeds it.

    Attributes:
        model: The module (eval mode).
        spec: What was loaded.
        transform: Classifiers/segmenters: PIL image -> (3, H, W) tensor.
        processor: Vision-language models: the HF processor.
        input_size: Classifiers: (H, W) of the model's input.
        labels: Classifiers: one list of accepted folder names per logit (wnid, class name, ...), or None.
        extra: Whatever else the task needs (e.g. the zoo's prompt format).
    """

    model: nn.Module
    spec: ModelSpec
    transform: Any = None
    processor: Any = None
    input_size: tuple[int, int] | None = None
    labels: list[list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _invalid(value: str, why: str) -> SystemExit:
    from tokenprune import zoo

    return SystemExit(f"unknown model {value!r}: {why}; --model takes " + VALID_MODELS.format(
        zoo=", ".join(zoo.available_models())))  # fmt: skip


def _hf_task(config: Any, where: str) -> str:
    """``"classification"`` or ``"vqa"`` from an HF config's architectures; else a clear error."""
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "classification"
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        return "vqa"
    raise SystemExit(
        f"{where}: architectures {architectures or '(none)'} is neither an image classifier (*ForImageClassification) "
        "nor a vision-language model (a config with vision_config and text_config)"
    )


def hub_directory(repo_id: str, allow_download: bool = False) -> Path:
    """The local snapshot of hub model ``repo_id``: from the Hugging Face cache only, unless ``allow_download``.

    Raises:
        SystemExit: Not in the cache (and downloads not allowed): the message says how to allow them.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=not allow_download))
    except LocalEntryNotFoundError as error:
        raise SystemExit(
            f"model {repo_id!r} is not in the local Hugging Face cache ($HF_HOME / ~/.cache/huggingface); "
            "download it first (huggingface-cli download ...) or pass --allow-download"
        ) from error
    except Exception as error:  # invalid repo id, gated repo, network refused, ...
        raise SystemExit(f"cannot load hub model {repo_id!r}: {type(error).__name__}: {error}") from error


def parse_model(value: str, allow_download: bool = False) -> ModelSpec:
    """What ``--model value`` names (see the module docstring); nothing heavy is loaded."""
    from tokenprune import zoo

    if value in zoo.available_models():
        return ModelSpec("zoo", zoo.task_of(value), value, value)
    if value.startswith(TIMM_PREFIX):
        arch = value[len(TIMM_PREFIX) :]
        if not arch:
            raise _invalid(value, "no architecture after 'timm:'")
        return ModelSpec("timm", "classification", arch, value)
    path = Path(value).expanduser()
    if path.is_dir() or value.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise _invalid(value, f"directory {path} has no config.json" if path.is_dir() else "no such directory")
        return _hf_spec(path, value)
    if "/" in value:  # a hub id
        return _hf_spec(hub_directory(value, allow_download), value)
    return ModelSpec("timm", "classification", value, value)  # a bare timm architecture, checked when built


def _hf_spec(directory: Path, label: str) -> ModelSpec:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        raise SystemExit(f"cannot read the Hugging Face config in {directory}: {error}") from error
    return ModelSpec("hf", _hf_task(config, str(directory)), str(directory), label, config)


def task_name(args_or_model: argparse.Namespace | str) -> str:
    """The task of a ``--model`` value (``args.allow_download`` is honoured for hub ids)."""
    if isinstance(args_or_model, str):
        return parse_model(args_or_model).task
    return parse_model(args_or_model.model, getattr(args_or_model, "allow_download", False)).task


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a torch file read with ``weights_only=True`` (no pickled code).

    A dict nesting it under ``state_dict`` / ``model`` / ``model_state_dict`` / ``module`` is unwrapped, and a
    ``module.`` prefix (DistributedDataParallel) dropped.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a readable checkpoint, or no tensors in it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (a .safetensors file or a torch state-dict file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors checkpoint {path}: {error}") from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling refused (weights_only) or not a torch file
            raise ValueError(
                f"cannot read {path} as a torch state dict with weights_only=True ({type(error).__name__}: {error}); "
                "save tensors only (torch.save(model.state_dict(), ...)) or use safetensors"
            ) from error
    while isinstance(state, dict) and len(state) >= 1 and any(k in state for k in _NESTED):
        nested = next((state[k] for k in _NESTED if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def build_timm(arch: str, img_size: int | None, checkpoint: str | None) -> nn.Module:
    """A timm model: random weights, or ``checkpoint``'s state dict (loaded strictly; its head sets the classes)."""
    import timm

    state = read_state_dict(checkpoint) if checkpoint else None
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size else {}
    if state is not None:
        head = next((state[k] for k in ("head.weight", "head.fc.weight", "fc.weight") if k in state), None)
        if head is not None and head.ndim == 2:
            kwargs["num_classes"] = head.shape[0]
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise _invalid(arch, f"not a tokenprune zoo name nor a timm architecture ({error})") from error
    if state is not None:
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = {
            k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
        }
        if missing or unexpected or shapes:
            raise ValueError(
                f"checkpoint {checkpoint} does not fit timm {arch!r}"
                f"{f' at --img-size {img_size}' if img_size else ''}: missing {_few(missing)}, unexpected "
                f"{_few(unexpected)}, shapes (file, model) {dict(list(shapes.items())[:4])}"
            )
        model.load_state_dict(state)
    return model.eval()


def _few(keys: list[str]) -> str:
    return f"{keys[:6]}{f' (+{len(keys) - 6} more)' if len(keys) > 6 else ''}"


def _timm_transform(model: nn.Module, size: int | None):
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(model=model)
    if size:
        config["input_size"] = (3, size, size)
    return create_transform(**config)


def _timm_labels(model: nn.Module) -> list[list[str]] | None:
    """Per logit: the wnid and names from the model's ``pretrained_cfg``, else ImageNet's when its class count is
    an ImageNet subset's (timm's ``ImageNetInfo``); None when neither."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    wnids = cfg.get("label_names")
    if wnids:
        names = cfg.get("label_descriptions") or {}
        return [[w, names[w]] if w in names else [w] for w in wnids]
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    info = ImageNetInfo(subset) if subset else None
    if info is None or info.num_classes() != getattr(model, "num_classes", None):
        return None
    descriptions = [info.index_to_description(i) for i in range(info.num_classes())]
    return [[w, d, d.split(",")[0]] for w, d in zip(info.label_names(), descriptions, strict=True)]


def load_classifier(spec: ModelSpec, img_size: int | None = None, checkpoint: str | None = None) -> LoadedModel:
    """A classifier for ``spec``: zoo, timm (random or ``checkpoint``), or a local HF ``*ForImageClassification``."""
    from tokenprune import zoo

    if spec.source == "zoo":
        model, transform = zoo.load_model(spec.name, checkpoint=checkpoint)
        entry = zoo.get_entry(spec.name)
        labels = [[w, n] for w, n in zip(entry.wnids, entry.class_names, strict=True)]
        size = img_size or entry.img_size
        return LoadedModel(model, spec, zoo.build_transform(size), input_size=(size, size), labels=labels)
    if spec.source == "timm":
        if checkpoint is not None and not spec.label.startswith(TIMM_PREFIX):
            raise SystemExit(
                f"--checkpoint applies to zoo models and timm:<arch>: write --model timm:{spec.name} to load "
                "a state dict into that timm architecture"
            )
        model = build_timm(spec.name, img_size, checkpoint)
        size = img_size or model.patch_embed.img_size[0]
        transform = _timm_transform(model, size) if checkpoint else zoo.build_transform(size)
        return LoadedModel(model, spec, transform, input_size=(size, size), labels=_timm_labels(model))
    if checkpoint is not None:
        raise SystemExit("--checkpoint is for zoo and timm: models; a Hugging Face directory holds its own weights")
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(spec.name, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(spec.name, local_files_only=True)

    def transform(image: Any) -> torch.Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    height, width = transform(_blank()).shape[-2:]
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [[str(id2label[i])] for i in range(len(id2label))] if id2label else None
    return LoadedModel(model, spec, transform, input_size=(height, width), labels=labels)


def _blank():
    from PIL import Image

    return Image.new("RGB", (224, 224))


def load_vlm(spec: ModelSpec, checkpoint: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A vision-language model and its processor: the zoo's ``llava-easyvqa``, or a local/cached HF directory."""
    from tokenprune import zoo

    if spec.source == "zoo":
        model, processor = zoo.load_model(spec.name, checkpoint=checkpoint)
        entry = zoo.get_entry(spec.name)
        extra = {"prompt": "easyvqa", "max_new_tokens": entry.max_new_tokens, "dataset": entry.dataset}
        return LoadedModel(model, spec, processor=processor, extra=extra)
    if checkpoint is not None:
        raise SystemExit("--checkpoint is for zoo and timm: models; a Hugging Face directory holds its own weights")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(spec.name, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(spec.name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot load the vision-language model in {spec.name}: {error}") from error
    return LoadedModel(model, spec, processor=processor, extra={"prompt": "chat", "max_new_tokens": 16})

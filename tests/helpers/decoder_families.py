"""Tiny random-weight text-only decoders, one case per supported class (nothing is downloaded).

Each is hidden 64, 4 layers, GQA 4/2 heads, vocab 200, with a larger-than-default init (peaky attention: rankings
far from ties), as the VLM families' text models (:mod:`tests.helpers.vlm_families`).
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as hf

from tests.helpers.vlm_families import TEXT, padded

#: Class name -> its config class.
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
}

#: Prompts of different lengths (ids 1..199; 0 is padding).
PROMPTS = {
    "a": [5, 17, 42, 8, 99, 23, 61, 7, 150, 33, 12, 77, 4, 180, 56, 9],
    "b": [11, 3, 140, 66, 25, 90, 13, 101, 47, 2, 38],
}


@functools.cache
def _weights(name: str) -> dict:
    torch.manual_seed(0)
    model = _fresh(name, "sdpa")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(name: str, attn: str) -> torch.nn.Module:
    model_cls, config_cls = (getattr(hf, n) for n in FAMILIES[name])
    extra = {"head_dim": 16} if name == "qwen3" else {}
    config = config_cls(**TEXT, **extra, tie_word_embeddings=False, pad_token_id=0)
    config._attn_implementation = attn
    return model_cls(config).eval()


def build(name: str, attn: str = "sdpa") -> torch.nn.Module:
    """A new eval-mode model of family ``name``; the same weights every call (and for both attentions)."""
    model = _fresh(name, attn)
    model.load_state_dict(_weights(name))
    return model


def inputs(names: list[str], side: str = "left") -> dict:
    """``input_ids`` (and ``attention_mask`` for a batch) of the prompts ``names``."""
    if len(names) == 1:
        return {"input_ids": torch.tensor([PROMPTS[names[0]]])}
    ids, mask = padded([PROMPTS[n] for n in names], side)
    return {"input_ids": ids, "attention_mask": mask}


family = pytest.mark.parametrize("name", list(FAMILIES))

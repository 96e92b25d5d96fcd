"""Vision-language model families: the declared adapter (:mod:`.base`), the LLM-side flow, one file per family.

Importing this package registers the families.
"""

from tokenprune.adapters.vlm import (  # noqa: F401  (each import registers its family's adapter)
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    qwen2_vl,
    qwen3_5,
    qwen3_vl,
)
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.state import DecoderState, VisualInputs

__all__ = ["DecoderState", "VLMAdapter", "VLMParts", "VisualInputs"]

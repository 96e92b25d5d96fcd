"""Vision-language model families: the declared adapter (:mod:`.base`), the LLM-side flow, one file per family.

Importing this package registers the families.
"""

from tokenprune.adapters.vlm import idefics3, llava, llava_onevision, qwen2_vl  # noqa: F401
from tokenprune.adapters.vlm.base import VLMAdapter, VLMParts
from tokenprune.adapters.vlm.state import DecoderState, VisualInputs

__all__ = ["DecoderState", "VLMAdapter", "VLMParts", "VisualInputs"]

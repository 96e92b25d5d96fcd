"""Model-family adapters; importing this package registers them.

The Hugging Face adapters (``hf_*``) never import transformers themselves: they match models only once
transformers is loaded (see ``hf_encoder.hf_classes``).
"""

from tokenprune.adapters import (  # noqa: F401
    hf_clip,
    hf_dinov2,
    hf_idefics3,
    hf_llava,
    hf_llava_onevision,
    hf_qwen2_vl,
    hf_siglip,
    hf_vit,
    segmenter,
    timm_vit,
)
from tokenprune.adapters.base import Adapter

__all__ = ["Adapter"]

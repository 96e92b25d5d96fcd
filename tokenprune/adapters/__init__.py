"""Model-family adapters; importing this package registers them.

The Hugging Face adapters (``hf_*``) never import transformers themselves: they match models only once
transformers is loaded (see ``hf_encoder.hf_classes``).
"""

from tokenprune.adapters import hf_clip, hf_dinov2, hf_llava, hf_qwen2_vl, hf_siglip, hf_vit, timm_vit  # noqa: F401
from tokenprune.adapters.base import Adapter

__all__ = ["Adapter"]

"""Model-family adapters; importing this package registers them.

The Hugging Face adapters (``hf_*``) never import transformers themselves: they match models only once
transformers is loaded (see ``base.hf_classes``).
"""

from tokenprune.adapters import decoder, vlm  # noqa: F401
from tokenprune.adapters.base import Adapter
from tokenprune.adapters.dense import segmenter  # noqa: F401
from tokenprune.adapters.vit import hf_clip, hf_dinov2, hf_siglip, hf_vit, timm  # noqa: F401

__all__ = ["Adapter"]

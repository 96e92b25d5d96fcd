"""Model-family adapters; importing this package registers them."""

from tokenprune.adapters import hf_llava, timm_vit  # noqa: F401
from tokenprune.adapters.base import Adapter

__all__ = ["Adapter"]

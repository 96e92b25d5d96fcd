"""Gradio demo: original vs token-reduced models side by side (needs the ``[demo]`` extra).

tokenprune demo --port 7860            # or: python demos/app.py
from tokenprune.demo import build_app, launch
"""

from tokenprune.demo.app import build_app, launch
from tokenprune.demo.classification import DEFAULT_MODEL, Demo, DemoModel, get_model
from tokenprune.demo.common import MAX_MEGAPIXELS, MAX_SIDE, InputError, read_image
from tokenprune.demo.token_maps import (
    CELL,
    DROPPED_RGB,
    EDGE_RGB,
    groups_from_source,
    model_crop,
    render_patch_grid,
    render_token_map,
)

__all__ = [
    "CELL",
    "DEFAULT_MODEL",
    "DROPPED_RGB",
    "EDGE_RGB",
    "MAX_MEGAPIXELS",
    "MAX_SIDE",
    "Demo",
    "DemoModel",
    "InputError",
    "build_app",
    "get_model",
    "groups_from_source",
    "launch",
    "model_crop",
    "read_image",
    "render_patch_grid",
    "render_token_map",
]

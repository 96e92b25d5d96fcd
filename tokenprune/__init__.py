"""tokenprune: one-call token merging and pruning for Vision Transformers and vision-language models, exact undo.

>>> patch = tokenprune.apply(model, "tome", r=8)   # or flops=0.5
>>> logits = model(images)
>>> patch.state.log                                 # tokens in/out per layer
>>> patch.remove()                                  # original modules back
"""

from tokenprune import adapters as _adapters  # noqa: F401  (registers adapters)
from tokenprune import methods as _methods  # noqa: F401  (registers methods)
from tokenprune.api import Patch, apply, disabled, get_patch
from tokenprune.calibrate import calibrate
from tokenprune.config import ReductionConfig
from tokenprune.measure.flops import FlopsReport, count_flops
from tokenprune.methods.base import LayerContext, Method
from tokenprune.methods.dense import EarlyExitMethod, ExitContext
from tokenprune.methods.vlm import (
    DecoderLayerContext,
    PreLLMContext,
    SpanReduction,
    TowerSignals,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
)
from tokenprune.registry import methods, register_adapter, register_method, unregister_method
from tokenprune.state import LayerLog, TokenState
from tokenprune.zoo import available_models, load_model

__version__ = "0.1.0"

__all__ = [
    "DecoderLayerContext",
    "EarlyExitMethod",
    "ExitContext",
    "FlopsReport",
    "LayerContext",
    "LayerLog",
    "Method",
    "Patch",
    "PreLLMContext",
    "ReductionConfig",
    "SpanReduction",
    "TokenState",
    "TowerSignals",
    "VLMReductionConfig",
    "VisualPlan",
    "VisualTokenMethod",
    "apply",
    "available_models",
    "calibrate",
    "count_flops",
    "disabled",
    "get_patch",
    "load_model",
    "methods",
    "register_adapter",
    "register_method",
    "unregister_method",
]

"""The one-call API: ``apply`` a method to a model, ``remove`` it, or run ``disabled`` for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from tokenprune import registry
from tokenprune.config import ReductionConfig
from tokenprune.methods.base import Method
from tokenprune.runtime import Runtime
from tokenprune.state import TokenState

_PATCH_ATTR = "_tokenprune_patch"
#: What each model kind is, for messages.
KIND_MODELS = {
    "vit": "ViT token sequences (timm VisionTransformer; HF ViT, CLIP, SigLIP, DINOv2 encoders)",
    "vlm": "visual tokens inside vision-language models (e.g. LlavaForConditionalGeneration)",
    "dense": "dense predictors with exit heads (tokenprune's ViTSegmenter, e.g. load_model('vit-s14-camvid'))",
    "llm": "prompt tokens inside text-only decoder LLMs (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)",
}


class Patch:
    """A method applied to a model. ``remove()`` puts the original modules back exactly.

    Attributes:
        model: The patched model (patched in place).
        method: Registered method name.
        config: The validated method config.
        schedule: Per-layer removal counts at the model's input size (None if the size is only known
            at forward time).
    """

    def __init__(self, model: nn.Module, method: str, config: ReductionConfig, adapter: Any, runtime: Runtime):
        self.model = model
        self.method = method
        self.config = config
        self.adapter = adapter
        self.runtime = runtime
        self.schedule: list[int] | None = None
        self._removed = False

    @property
    def state(self) -> TokenState | None:
        """Token bookkeeping of the most recent patched forward (None before the first)."""
        return self.runtime.state

    def remove(self) -> nn.Module:
        """Restore the original modules and methods; returns the model."""
        if self._removed:
            raise RuntimeError("this patch was already removed")
        self.adapter.uninstall()
        delattr(self.model, _PATCH_ATTR)
        self._removed = True
        return self.model

    def __repr__(self) -> str:
        return f"Patch(method={self.method!r}, model={type(self.model).__name__}, schedule={self.schedule})"


def apply(model: nn.Module, method: str, **options: Any) -> Patch:
    """Patch ``model`` in place with a token-reduction ``method``.

    Args:
        model: A supported model (see ``tokenprune.adapters``).
        method: A registered method name (``tokenprune.methods()``).
        **options: The method's config fields, e.g. ``r=8`` or ``flops=0.5`` (+ ``input_size`` for
            dynamic-size models).

    Returns:
        The :class:`Patch`; call ``patch.remove()`` to undo.

    Raises:
        ValueError: Unknown method, impossible schedule or budget.
        TypeError: Unsupported model or unknown option.
        RuntimeError: The model is already patched.
    """
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise RuntimeError(
            f"model is already patched with {getattr(model, _PATCH_ATTR).method!r}; call patch.remove() first"
        )
    entry = registry.get_method(method)
    config = entry.config_cls.from_dict(options)
    adapter_cls = registry.find_adapter(model)
    if adapter_cls.kind not in entry.kinds:
        reduces = " and ".join(KIND_MODELS[kind] for kind in registry.KINDS if kind in entry.kinds)
        raise TypeError(
            f"method {method!r} reduces {reduces}; {type(model).__name__} is a {adapter_cls.kind!r} model "
            f"({KIND_MODELS[adapter_cls.kind]}), which takes: {registry.methods(adapter_cls.kind)}"
        )
    method_impl: Method = entry.method_cls(config)
    adapter = adapter_cls(model)
    if method_impl.needs_class_token and not adapter.has_class_token:
        raise ValueError(
            f"method {method!r} scores tokens by class-token attention, but this model has no class token; "
            f"methods that work without one: {[m for m in registry.methods(adapter.kind) if m != method]}"
        )
    method_impl.check_model(adapter)
    runtime = Runtime(method_impl, config, adapter.depth, adapter.num_protected)
    schedule = adapter.resolve_schedule(runtime)
    adapter.install(runtime)
    patch = Patch(model, method, config, adapter, runtime)
    patch.schedule = schedule
    setattr(model, _PATCH_ATTR, patch)
    return patch


def get_patch(model: nn.Module) -> Patch | None:
    """The active patch of ``model``, or None."""
    return getattr(model, _PATCH_ATTR, None)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original (unreduced) path inside the block; a no-op for an unpatched model."""
    patch = get_patch(model)
    if patch is None:
        yield model
        return
    previous = patch.runtime.enabled
    patch.runtime.enabled = False
    try:
        yield model
    finally:
        patch.runtime.enabled = previous

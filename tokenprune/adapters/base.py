"""What an adapter is: it knows where a model family's layers are and how to feed a shorter sequence on."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from tokenprune.core.schedule import solve_flops_schedule
from tokenprune.methods.base import Method

SUPPORTED_ATTENTION = ("sdpa", "eager")


def check_attn_implementation(config: Any, owner: str, reason: str) -> None:
    """Raise unless a Hugging Face ``config`` runs attention as ``sdpa`` or ``eager``.

    Args:
        config: The model (or sub-model) config holding ``_attn_implementation``.
        owner: Model class name for the message.
        reason: Why tokenprune needs one of these there (said in the message).
    """
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"{owner} uses attn_implementation={implementation!r}; tokenprune supports "
            f"{list(SUPPORTED_ATTENTION)} {reason}: load the model with attn_implementation='sdpa' or call "
            "model.set_attn_implementation('sdpa')"
        )


def hf_classes(*names: str) -> Callable[[Any], bool]:
    """Predicate: ``model`` is an instance of one of the named ``transformers`` classes.

    Never imports transformers itself: if it is not loaded, no model can be one of its classes.
    """

    def predicate(model: Any) -> bool:
        module = sys.modules.get("transformers")
        if module is None or not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
            return False  # cheap exit: no lazy transformers import for timm or other models
        classes = tuple(getattr(module, name) for name in names if hasattr(module, name))
        return bool(classes) and isinstance(model, classes)

    return predicate


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module`` (``in x out`` each)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class Adapter:
    """Base class for model-family adapters.

    Subclasses set the attributes below in ``__init__`` and implement ``install``/``uninstall`` and the
    three analytic FLOPs pieces. All FLOPs here are per image and count 2 x MAC of matmuls and
    convolutions, the same convention as ``torch.utils.flop_counter``.

    Attributes:
        depth: Number of layers a schedule has entries for.
        num_protected: Prefix tokens never reduced (class and register tokens).
        has_class_token: Whether token 0 is a class token.
        has_static_size: Whether the token count is fixed by the model (no ``input_size`` needed).
        num_heads: Attention heads per layer (for method overhead FLOPs).
        head_dim: Channels per head.
    """

    description: ClassVar[str] = ""
    #: Which methods run on it: those whose ``kinds`` hold this (``vit``, ``vlm`` or ``dense``).
    kind: ClassVar[str] = "vit"
    depth: int
    num_protected: int
    has_class_token: bool
    has_static_size: bool
    num_heads: int
    head_dim: int

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def resolve_schedule(self, runtime: Any) -> list[int] | None:
        """The per-layer schedule at apply time (None if only known per forward); solves a FLOPs budget.

        ViT adapters: ``r`` resolved (or ``flops`` solved) for the model's input size, so an impossible schedule
        fails at apply time, not at the first forward. Vision-language adapters override it (per prompt).
        """
        config, method = runtime.config, runtime.method
        if config.flops is not None:
            num_tokens = self.num_tokens(config.input_size)
            schedule = solve_flops_schedule(
                config.flops,
                self.depth,
                num_tokens,
                self.num_protected,
                method.max_removable,
                lambda s: self.analytic_flops(num_tokens, s, method)["total"],
            )
            runtime.schedule_spec = schedule
            return schedule
        if self.has_static_size or config.input_size is not None:
            return runtime.schedule_for(self.num_tokens(config.input_size))
        return None

    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        """Tokens entering the first layer for an input of ``input_size`` (model default if None)."""
        raise NotImplementedError

    def install(self, runtime: Any) -> None:
        """Wrap the model's layers so they run ``runtime``'s method."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Put every original module and method back."""
        raise NotImplementedError

    def embed_flops(self, num_tokens: int) -> float:
        """FLOPs before the first layer."""
        raise NotImplementedError

    def layer_flops(self, layer: int, tokens_in: int, tokens_out: int) -> float:
        """FLOPs of one layer whose attention sees ``tokens_in`` and whose MLP sees ``tokens_out``."""
        raise NotImplementedError

    def head_flops(self, num_tokens: int) -> float:
        """FLOPs after the last layer, given the tokens that leave it."""
        raise NotImplementedError

    def analytic_flops(self, num_tokens: int, schedule: list[int], method: Method | None = None) -> dict:
        """Per-layer analytic FLOPs table for a forward entering with ``num_tokens`` and ``schedule``.

        Returns:
            ``{"embed", "head", "total", "layers": [{"layer", "tokens_in", "tokens_out", "flops",
            "method_flops"}]}``, all per image.
        """
        rows = []
        tokens = num_tokens
        for layer, removed in enumerate(schedule):
            overhead = 0.0
            if method is not None and removed > 0:
                overhead = method.overhead_flops(tokens, self.num_protected, removed, self.num_heads, self.head_dim)
            block = self.layer_flops(layer, tokens, tokens - removed)
            rows.append(
                {
                    "layer": layer,
                    "tokens_in": tokens,
                    "tokens_out": tokens - removed,
                    "flops": block + overhead,
                    "method_flops": overhead,
                }
            )
            tokens -= removed
        embed = self.embed_flops(num_tokens)
        head = self.head_flops(tokens)
        total = embed + head + sum(row["flops"] for row in rows)
        return {"embed": embed, "head": head, "total": total, "layers": rows}

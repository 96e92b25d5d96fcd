"""Method and adapter registries (PEFT/timm style): extend tokenprune without editing it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_METHODS: dict[str, MethodEntry] = {}
_ADAPTERS: list[tuple[Callable[[Any], bool], type, str]] = []


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, config dataclass and implementation class."""

    name: str
    config_cls: type
    method_cls: type


def register_method(name: str, config_cls: type, method_cls: type) -> None:
    """Register a token-reduction method under ``name``."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    _METHODS[name] = MethodEntry(name, config_cls, method_cls)


def get_method(name: str) -> MethodEntry:
    """Look a method up; unknown names raise with the registered ones listed."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_METHODS)}") from None


def methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def register_adapter(predicate: Callable[[Any], bool], adapter_cls: type, description: str) -> None:
    """Register an adapter used for models where ``predicate(model)`` is true (first match wins)."""
    _ADAPTERS.append((predicate, adapter_cls, description))


def find_adapter(model: Any) -> type:
    """The adapter class for ``model``; unsupported models raise with the supported families listed."""
    for predicate, adapter_cls, _ in _ADAPTERS:
        if predicate(model):
            return adapter_cls
    supported = [description for _, _, description in _ADAPTERS]
    raise TypeError(f"unsupported model type {type(model).__name__}; supported: {supported}")

"""Method and adapter registries (PEFT/timm style): extend tokenprune without editing it.

Capabilities are data: a method class declares the model kinds it reduces (``kinds``) and the options under which
it reduces nothing (``identity``); an adapter class declares its ``kind``. ``tokenprune.apply``, the CLI, the eval
harness, the demo and the test matrices all read these, so no method name is hard-coded outside ``methods/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: Model kinds: ViT token sequences (classifiers, backbones), vision-language models, dense predictors (segmenters),
#: text-only decoder LLMs (prompt tokens).
KINDS = ("vit", "vlm", "dense", "llm")

_METHODS: dict[str, MethodEntry] = {}
_ADAPTERS: list[tuple[Callable[[Any], bool], type, str]] = []


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, config dataclass and implementation class.

    Attributes:
        name: Registered name (``tokenprune.apply(model, name, ...)``).
        config_cls: The method's config dataclass (``from_dict`` validates keyword options).
        method_cls: The implementation; its ``kinds`` and ``identity`` class attributes are the capabilities.
    """

    name: str
    config_cls: type
    method_cls: type

    @property
    def kinds(self) -> frozenset[str]:
        """Model kinds the method reduces (a subset of :data:`KINDS`)."""
        return frozenset(self.method_cls.kinds)

    @property
    def identity(self) -> dict[str, Any]:
        """Options with which the method reduces nothing (the patched model equals the unpatched one)."""
        return dict(self.method_cls.identity)

    @property
    def example(self) -> dict[str, Any]:
        """Options of a typical reducing call on a small model (docs, test matrices)."""
        return dict(self.method_cls.example)

    @property
    def summary(self) -> str:
        """First line of the method's docstring (for listings)."""
        return (self.method_cls.__doc__ or "").strip().splitlines()[0] if self.method_cls.__doc__ else ""


def register_method(name: str, config_cls: type, method_cls: type) -> None:
    """Register a token-reduction method under ``name``.

    Args:
        name: The name ``tokenprune.apply`` takes.
        config_cls: Its config dataclass (a ``tokenprune.ReductionConfig`` or ``tokenprune.VLMReductionConfig``).
        method_cls: Its implementation (a ``tokenprune.Method`` or ``tokenprune.VisualTokenMethod``), declaring
            ``kinds`` (which of ``vit``/``vlm``/``dense``/``llm``) and ``identity`` (options that reduce nothing).

    Raises:
        ValueError: The name is taken, or the declared kinds or identity options are invalid.
    """
    if name in _METHODS:
        raise ValueError(f"method {name!r} is already registered")
    kinds = getattr(method_cls, "kinds", None)
    if not kinds or not set(kinds) <= set(KINDS):
        raise ValueError(f"method {name!r} must declare kinds, a non-empty subset of {list(KINDS)}; got {kinds!r}")
    identity = getattr(method_cls, "identity", None)
    if not isinstance(identity, Mapping):
        raise ValueError(f"method {name!r} must declare identity, the options that reduce nothing (a mapping)")
    fields = set(config_cls.field_names())
    for attribute in ("identity", "example"):
        unknown = sorted(set(getattr(method_cls, attribute, {})) - fields)
        if unknown:
            raise ValueError(f"{attribute} options {unknown} of {name!r} are not fields of {config_cls.__name__}")
    _METHODS[name] = MethodEntry(name, config_cls, method_cls)


def unregister_method(name: str) -> None:
    """Remove a registered method (for user methods defined in a session or a test)."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_METHODS)}")
    del _METHODS[name]


def get_method(name: str) -> MethodEntry:
    """Look a method up; unknown names raise with the registered ones listed."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_METHODS)}") from None


def methods(kind: str | None = None) -> list[str]:
    """Names of the registered methods, sorted; with ``kind`` (one of :data:`KINDS`) those for that kind."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {list(KINDS)}")
    return sorted(name for name, entry in _METHODS.items() if kind is None or kind in entry.kinds)


def register_adapter(predicate: Callable[[Any], bool], adapter_cls: type, description: str) -> None:
    """Register an adapter used for models where ``predicate(model)`` is true (first match wins).

    ``adapter_cls.kind`` (one of :data:`KINDS`) says which methods it runs.
    """
    if getattr(adapter_cls, "kind", None) not in KINDS:
        raise ValueError(f"adapter {adapter_cls.__name__} must declare kind, one of {list(KINDS)}")
    _ADAPTERS.append((predicate, adapter_cls, description))


def adapters(kind: str | None = None) -> list[tuple[type, str]]:
    """Registered adapter classes with their descriptions, in match order (of one ``kind`` if given)."""
    return [(cls, text) for _, cls, text in _ADAPTERS if kind is None or cls.kind == kind]


def find_adapter(model: Any) -> type:
    """The adapter class for ``model``; unsupported models raise with the supported families listed."""
    for predicate, adapter_cls, _ in _ADAPTERS:
        if predicate(model):
            return adapter_cls
    supported = [description for _, _, description in _ADAPTERS]
    raise TypeError(f"unsupported model type {type(model).__name__}; supported: {supported}")

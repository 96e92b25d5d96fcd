"""Optional dependencies: an import that fails names the extra that installs it.

``pip install tokenprune`` is the library (apply/remove, FLOPs); the reference models, the eval harness and the
demo each need a few more packages, installed by an extra: ``tokenprune[zoo]``, ``tokenprune[eval]``,
``tokenprune[vqa]``, ``tokenprune[demo]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Imports ``module`` or raises an ``ImportError`` that says which extra to install.

    Args:
        module: Dotted module name, e.g. ``"matplotlib.pyplot"``.
        extra: The tokenprune extra that installs it, e.g. ``"eval"``.
        purpose: What needs it, for the message (e.g. ``"sweep plots"``).

    Raises:
        ImportError: The module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        need = f" for {purpose}" if purpose else ""
        raise ImportError(
            f"{module.split('.')[0]} is needed{need}: pip install 'tokenprune[{extra}]' ({error})"
        ) from error

"""Built-in methods; importing this package registers them."""

from tokenprune.methods import aim, dtop, evit, fastv, none, random_drop, random_visual, tome  # noqa: F401
from tokenprune.methods.base import LayerContext, Method

__all__ = ["LayerContext", "Method"]

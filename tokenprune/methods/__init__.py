"""Built-in methods; importing this package registers them (one import line per method file)."""

import tokenprune.methods.aim
import tokenprune.methods.cdpruner
import tokenprune.methods.dart
import tokenprune.methods.divprune
import tokenprune.methods.dtop
import tokenprune.methods.dycoke
import tokenprune.methods.evit
import tokenprune.methods.fastv
import tokenprune.methods.lazyllm
import tokenprune.methods.none
import tokenprune.methods.pitome
import tokenprune.methods.ppt
import tokenprune.methods.pyramiddrop
import tokenprune.methods.random_drop
import tokenprune.methods.random_pre_llm
import tokenprune.methods.random_visual
import tokenprune.methods.sparsevlm
import tokenprune.methods.tome
import tokenprune.methods.visionzip
import tokenprune.methods.vispruner  # noqa: F401  (each import registers its method)
from tokenprune.methods.base import LayerContext, Method

__all__ = ["LayerContext", "Method"]

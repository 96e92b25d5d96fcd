"""Text-only decoder LLMs (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``): model kind ``"llm"``.

Importing this package registers the adapter.
"""

from tokenprune.adapters.decoder import causal_lm  # noqa: F401  (registers the adapter)
from tokenprune.adapters.decoder.causal_lm import FAMILIES, CausalLMAdapter
from tokenprune.adapters.decoder.revival import AuxCache

__all__ = ["FAMILIES", "AuxCache", "CausalLMAdapter"]

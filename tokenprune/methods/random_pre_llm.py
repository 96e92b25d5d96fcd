"""``random_pre_llm``: the random baseline of the methods that act before the LLM.

Each image keeps ``keep`` (or ``tokens=N``) of its visual tokens chosen uniformly at random, before the LLM;
the LLM never sees the others. Same count per image, same FLOPs as ``visionzip``/``divprune``/``vispruner``/
``cdpruner`` at the same ``keep``/``tokens``/``flops``: what their scoring buys over chance ("Random" in their
papers' tables). ``random_visual`` is the in-LLM one (FastV's shape).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenprune.methods.base import SeededRandom
from tokenprune.methods.vlm import PreLLMConfig, PreLLMContext, PreLLMMethod, SpanReduction
from tokenprune.registry import register_method


@dataclass
class RandomPreLLMConfig(PreLLMConfig):
    """Random visual tokens kept per image before the LLM.

    Attributes:
        keep: Fraction of each image's visual tokens kept, in (0, 1]; default 0.5. Give one of ``keep``,
            ``tokens`` or ``flops``.
        tokens: Exact visual tokens kept per image, an int >= 1.
        seed: Seed of the patch's own generator (None: nondeterministic).
    """

    seed: int | None = 0


class RandomPreLLM(PreLLMMethod):
    """Uniformly random visual tokens per image, kept in spatial order, before the LLM."""

    name = "random_pre_llm"
    identity = {"keep": 1.0}
    example = {"keep": 0.5}
    batch_invariant = False  # one generator draws for the whole batch

    def __init__(self, config: RandomPreLLMConfig) -> None:
        super().__init__(config)
        self._random = SeededRandom(config.seed)

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        return ctx.select(self._random.rand(tuple(ctx.embeds.shape[:2]), ctx.embeds.device))  # (S, n) scores


register_method("random_pre_llm", RandomPreLLMConfig, RandomPreLLM)

"""``random_visual``: the random baseline for vision-language models, in FastV's shape.

After layer ``k``, keep a ``keep`` fraction of each image's visual tokens chosen uniformly at random (no
attention is read); later layers, and their KV cache, hold only the kept ones. Same schedule and FLOPs as
``fastv`` with the same ``k``/``keep``/``flops``, so the two compare at equal cost: what FastV's attention
ranking buys over chance. (``random`` is the ViT baseline; vision-language adapters take this one.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.methods.base import SeededRandom
from tokenprune.methods.fastv import FastV, FastVConfig
from tokenprune.methods.vlm import DecoderLayerContext
from tokenprune.registry import register_method


@dataclass
class RandomVisualConfig(FastVConfig):
    """FastV's options (``k``, ``keep`` or ``flops``) plus the seed of the patch's own generator.

    Attributes:
        seed: Seed of the generator the random scores come from (None: nondeterministic).
    """

    seed: int | None = 0


class RandomVisual(FastV):
    """Uniformly random visual tokens kept after layer ``k``."""

    name = "random_visual"
    identity = {"keep": 1.0}
    example = {"k": 2, "keep": 0.5}
    batch_invariant = False  # one generator draws for the whole batch
    # It computes no attention row, so it is charged none (FastV's is a (1 x D) @ (D x N) product, ~0.01% of a
    # layer): analytic FLOPs equal the counter's. On every prompt of the published easy-VQA sweep a FLOPs budget
    # still solves to exactly FastV's plan (eval/check_random_visual_plans.py: all 1,000 test prompts, every budget).
    query_rows = "none"

    def __init__(self, config: RandomVisualConfig) -> None:
        super().__init__(config)
        self._random = SeededRandom(config.seed)

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        return self._random.rand(tuple(ctx.valid.shape), ctx.valid.device)


register_method("random_visual", RandomVisualConfig, RandomVisual)

"""``visionzip``: VisionZip (Yang et al., CVPR 2025), "VisionZip: Longer is Better but Not Necessary in VLMs".

Before the LLM, each image keeps ``K`` tokens: ``K - C`` *dominant* ones, the patches the class token attends to
most in the penultimate tower layer (towers without a class token, e.g. SigLIP: the mean attention each patch
receives), and ``C`` *contextual* ones: the other patches, ``C`` of them spread uniformly over their order as
targets, each remaining patch joining the target whose head-averaged key is most cosine-similar. The paper's
split is 54 + 10 of 64 (and 108 + 20 of 128, 162 + 30 of 192): ``contextual = 10/64``.

Kept from the reference code: the dominant ranking, the uniform targets, the key-cosine assignment. Changed: the
tower's attention and keys come from hooks on its own queries and keys (no ``output_attentions``, the tower stays
on SDPA); a contextual token is the plain mean of its whole group (the reference adds the target to the mean of
the others), taken over the LLM-side (projected) embeddings and stored at the target's position, so tokens stay
in spatial order and sizes count the patches each stands for; LLaVA's class token is not among the LLM's tokens,
so it is not kept. Paper (abstract, arXiv 2412.04467): "VisionZip outperforms the previous state-of-the-art
method by at least 5% performance gains across nearly all settings", prefilling time improved by 8x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenprune.methods.vlm import (
    PreLLMContext,
    SpanReduction,
    TowerLayerConfig,
    TowerLayerMethod,
    check_fraction,
    count,
)
from tokenprune.registry import register_method


@dataclass
class VisionZipConfig(TowerLayerConfig):
    """VisionZip (Yang et al., CVPR 2025): dominant tokens by tower attention, the rest merged into a few groups.

    Attributes:
        keep: Fraction of each image's tokens kept before the LLM, in (0, 1]; default 64/576 (the paper's
            smallest LLaVA-1.5 setting) when neither ``tokens`` nor ``flops`` is given.
        tokens: Exact tokens kept per image (an int >= 1; an image with fewer keeps all of them).
            Give one of ``keep``, ``tokens`` or ``flops``.
        contextual: Fraction of the kept tokens that are contextual (merged) tokens, in [0, 1]; default 10/64.
        layer: Vision-tower layer whose attention and keys rank and group the tokens (negative: from the end);
            default None: the penultimate (the paper's; LLaVA reads its features there), or the only one of a
            one-layer tower.
    """

    contextual: float = 10 / 64
    default_keep: ClassVar[float] = 64 / 576

    def __post_init__(self) -> None:
        super().__post_init__()
        self.contextual = check_fraction("contextual (fraction of the kept tokens)", self.contextual, False)


def contextual_groups(keys: torch.Tensor, targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ``m`` tokens around ``targets`` uniformly spaced ones by the cosine similarity of their ``keys``.

    Args:
        keys: ``(S, m, D)`` keys of the tokens to group, ``m > targets >= 1``.
        targets: Number of groups.

    Returns:
        ``(target_rows, group)``: ``(targets,)`` which rows are the targets, ``(S, m)`` every row's group.
    """
    m = keys.shape[1]
    target_rows = torch.arange(0, m, max(1, m // targets), device=keys.device)[:targets]  # (C,)
    is_target = torch.zeros(m, dtype=torch.bool, device=keys.device)
    is_target[target_rows] = True
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit[:, ~is_target] @ unit[:, target_rows].transpose(1, 2)  # (S, m - C, C)
    group = torch.empty(keys.shape[:2], dtype=torch.long, device=keys.device)  # (S, m)
    group[:, target_rows] = torch.arange(targets, device=keys.device)
    group[:, ~is_target] = similarity.argmax(dim=-1)
    return target_rows, group


class VisionZip(TowerLayerMethod):
    """Dominant tokens by the tower's attention, plus contextual tokens merged by key similarity."""

    name = "visionzip"
    identity = {"keep": 1.0}
    example = {"keep": 0.5, "contextual": 0.25}
    batch_invariant = True
    _key_dim = 0  # the tower's key width, read from the keys at the last merge (for merge_flops)

    def split(self, keep: int) -> tuple[int, int]:
        """``(dominant, contextual)`` tokens of an image that keeps ``keep``."""
        contextual = count(self.config.contextual, keep)
        return keep - contextual, contextual

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        x, tower = ctx.embeds, ctx.tower  # (S, n, C)
        dominant, contextual = self.split(ctx.keep)
        if contextual == 0:
            return ctx.select(tower.attention)
        s, n, channels = x.shape
        self._key_dim = tower.keys.shape[-1]
        top = tower.attention.topk(dominant, dim=1).indices  # (S, Kd)
        is_rest = torch.ones(s, n, dtype=torch.bool, device=x.device).scatter(1, top, False)
        rest = is_rest.nonzero()[:, 1].view(s, n - dominant)  # (S, m) ascending positions of the others
        keys = tower.keys.gather(1, rest[..., None].expand(-1, -1, self._key_dim))  # (S, m, D)
        target_rows, group = contextual_groups(keys, contextual)
        members = x.gather(1, rest[..., None].expand(-1, -1, channels)).float()  # (S, m, C)
        sums = members.new_zeros(s, contextual, channels).scatter_add_(1, group[..., None].expand_as(members), members)
        sizes = members.new_zeros(s, contextual).scatter_add_(1, group, members.new_ones(group.shape))  # (S, Kc)
        index = torch.cat([top, rest[:, target_rows]], dim=1)  # (S, K): dominant, then each group's target
        merged = (sums / sizes[..., None]).to(x.dtype)  # (S, Kc, C) each group's mean
        embeds = torch.cat([x.gather(1, top[..., None].expand(-1, -1, channels)), merged], dim=1)
        size = torch.cat([torch.ones_like(top, dtype=x.dtype), sizes.to(x.dtype)], dim=1)
        order = index.argsort(dim=1)  # ascending positions overall
        # Which kept token stands for each span token: dominant i -> i, a contextual member -> Kd + its group,
        # then renumbered in the ascending order.
        unsorted = torch.empty(s, n, dtype=torch.long, device=x.device)
        unsorted.scatter_(1, top, torch.arange(dominant, device=x.device).expand_as(top))
        unsorted.scatter_(1, rest, dominant + group)
        rank = order.argsort(dim=1)  # (S, K) unsorted id -> its place in the ascending order
        return SpanReduction(
            index.gather(1, order),
            embeds.gather(1, order[..., None].expand_as(embeds)),
            size.gather(1, order),
            rank.gather(1, unsorted),
        )

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        if keep >= tokens:
            return 0.0
        dominant, contextual = self.split(keep)
        if contextual == 0:
            return 0.0
        others = tokens - dominant - contextual
        return 2.0 * others * contextual * self._key_dim  # the (m - C) x D @ D x C cosine similarity


register_method("visionzip", VisionZipConfig, VisionZip)

"""``pitome``: PiToMe (Tran et al., NeurIPS 2024), "Accelerating Transformers with Spectrum-Preserving Token Merging".

Per layer, every reducible token gets an *energy score*: the mean over all reducible tokens of
``ELU(cos(k_i, k_j) - margin)`` on the head-averaged keys (ToMe's metric). High energy means many similar
neighbours (a redundant token in a large uniform region); low energy marks the informative tokens, which are
protected. The ``2r`` highest-energy tokens are split alternately (in energy order) into sets A and B and each
A token merges into its most similar B token (size-weighted average), so exactly ``r`` tokens go.

Kept from the reference code (``hchautran/PiToMe``, ``algo/pitome/merge.py`` ``pitome_vision`` and the timm/DeiT
patches): the energy score with ``alpha = 1``, the per-layer margin ``0.9 - 0.8 * layer / depth``, the top-``2r``
mergeable set split alternately, merging every A token into its best B, size-weighted averages and proportional
attention. Changed: the margin schedule uses the model's depth as the reference does, but ``margin`` can also be
one float for every layer; the merge goes through the shared order-preserving plan (:mod:`tokenprune.core.merge`),
so tokens stay in spatial order instead of ``[protected, merged]`` order, and removal is real under fused SDPA
(keys come from the capture hooks, no attention map is materialised). The reference's ``r = T - T * ratio``
per-layer ratio is replaced by the library's schedule (``r`` per layer, ``flops=`` or ``tokenprune.calibrate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenprune.config import ReductionConfig
from tokenprune.core.merge import kept_positions, reduce_tokens
from tokenprune.methods.base import LayerContext, Method
from tokenprune.registry import register_method
from tokenprune.state import TokenState


@dataclass
class PiToMeConfig(ReductionConfig):
    """PiToMe: protect low-energy (informative) tokens, merge the redundant ones by bipartite matching.

    Attributes:
        margin: Similarity margin of the energy score: a float for every layer, or None for the paper's
            per-layer schedule ``0.9 - 0.8 * layer / depth`` (stricter early, looser late).
        alpha: ELU slope below the margin (1.0 in the paper).
        prop_attn: Proportional attention (``log(size)`` added to attention logits) once tokens are merged.
    """

    margin: float | None = None
    alpha: float = 1.0
    prop_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin is not None and not -1.0 <= float(self.margin) <= 1.0:
            raise ValueError(
                f"margin is a cosine similarity in [-1, 1] (or None for the per-layer one), got {self.margin}"
            )
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


def energy_scores(metric: torch.Tensor, margin: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's energy of every token and the cosine similarities it came from.

    Args:
        metric: ``(B, N, D)`` features of the reducible tokens.
        margin: Similarity margin.
        alpha: ELU slope below the margin.

    Returns:
        ``(energy (B, N), similarity (B, N, N))``.
    """
    metric = F.normalize(metric, p=2, dim=-1)
    similarity = metric @ metric.transpose(-1, -2)  # (B, N, N)
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1), similarity


def pitome_plan(
    metric: torch.Tensor, r: int, num_protected: int, margin: float, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge plan of one PiToMe layer: ``(src, dst, kept)`` positions for :func:`reduce_tokens`.

    Args:
        metric: ``(B, N, D)`` similarity features of every token (prefix included; it never merges).
        r: Tokens to remove, ``0 <= r <= (N - num_protected) // 2``.
        num_protected: Leading tokens that never merge.
        margin: Energy margin of this layer.
        alpha: ELU slope.

    Returns:
        ``(B, r)`` sources, ``(B, r)`` destinations and ``(B, N - r)`` sorted kept positions.
    """
    n = metric.shape[1]
    if not 0 <= r <= (n - num_protected) // 2:
        raise ValueError(
            f"r={r} is out of range for {n - num_protected} reducible tokens: 0 <= r <= {(n - num_protected) // 2}"
        )
    energy, similarity = energy_scores(metric[:, num_protected:], margin, alpha)  # (B, M), (B, M, M)
    order = energy.argsort(dim=-1, descending=True)[:, : 2 * r]  # (B, 2r) most redundant first
    set_a, set_b = order[:, ::2], order[:, 1::2]  # (B, r) each
    rows = similarity.gather(1, set_a.unsqueeze(-1).expand(-1, -1, similarity.shape[-1]))  # (B, r, M)
    best_b = rows.gather(2, set_b.unsqueeze(1).expand(-1, r, -1)).argmax(dim=-1)  # (B, r) index into set_b
    src = set_a + num_protected
    dst = set_b.gather(1, best_b) + num_protected
    remove = torch.zeros(metric.shape[:2], dtype=torch.bool, device=metric.device)
    remove.scatter_(1, src, True)
    return src, dst, kept_positions(remove, r)


class PiToMe(Method):
    """Energy-protected bipartite merging: the ``2r`` most redundant tokens pair up, ``r`` merge away."""

    name = "pitome"
    kinds = frozenset({"vit"})
    identity = {"r": 0}
    example = {"r": 2}
    needs = frozenset({"keys"})

    def __init__(self, config: PiToMeConfig) -> None:
        super().__init__(config)
        self.depth: int | None = None

    def check_model(self, adapter) -> None:
        self.depth = adapter.depth  # the per-layer margin is a fraction of the depth

    def margin(self, layer: int) -> float:
        """This layer's energy margin (the config's, or ``0.9 - 0.8 * layer / depth``)."""
        if self.config.margin is not None:
            return float(self.config.margin)
        return 0.9 - 0.8 * layer / (self.depth or 1)

    def max_removable(self, reducible: int) -> int:
        return reducible // 2  # 2r tokens pair up

    def reduce(self, x: torch.Tensor, state: TokenState, r: int, ctx: LayerContext) -> torch.Tensor:
        src, dst, kept = pitome_plan(
            ctx.key_metric(), r, state.num_protected, self.margin(ctx.layer), self.config.alpha
        )
        return reduce_tokens(x, state, kept, src, dst)

    def overhead_flops(self, num_tokens: int, num_protected: int, r: int, num_heads: int, head_dim: int) -> float:
        # The full (M x D) @ (D x M) cosine similarity of the head-averaged keys of the reducible tokens.
        reducible = num_tokens - num_protected
        return 2.0 * reducible * reducible * head_dim


register_method("pitome", PiToMeConfig, PiToMe)

"""``dart``: DART (Wen et al., 2025), "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More".

After layer ``k`` (DART's K, default 2), a few *pivot* tokens are picked: the ``pivot_image`` visual tokens and
the ``pivot_text`` instruction tokens (text after the first visual token) whose keys have the largest L1 norm.
The visual tokens kept are the image pivots and, for each pivot in turn, its share of the remaining budget among
the visual tokens least cosine-similar to it (hidden states after layer ``k - 1``), each token chosen once:
duplicates of a pivot go, whatever their attention. Text is never removed.

Kept from the reference code (``ZichenWen1/DART``, ``get_retained_image_token`` in its LLaMA and Qwen2-VL
models): the pruning point (layers ``0 .. k-1`` see every visual token), pivots by the L1 norm of the layer's
keys over all heads, text pivots among the tokens after the image, the candidates (visual tokens that are not
image pivots and not yet chosen), the negative cosine similarity of the hidden states after the language
model's final norm (``norm=True``; the norm module is read from the adapter's language model at ``apply``), the
text pivots themselves never kept, the defaults (K = 2, 4 + 4 pivots, ``reduction_ratio`` 0.778).

Changed: the key norms are taken before the rotary embedding (the reference's ``any_states`` are after it): a
rotation keeps the L2 norm but not the L1 norm, so rotated keys would rank by absolute position, and a
left-padded batch numbered without ``position_ids`` would pick other pivots than the same prompt alone. The
budget is exact: the reference gives every pivot ``floor(budget / pivots)`` tokens on top of the image pivots
(its "128 tokens" keep 132); here a sample keeps exactly the plan's count (``keep``, or what a ``flops=``
budget solves for): the image pivots (at most that many), then the rest split over the pivots, the first
``rest % pivots`` taking one more. Pivots are visited in sequence order (the reference walks a Python set: hash
order); ties go to the earlier token. Batches of any padding (the reference asserts batch size 1), every family,
several images per prompt (their tokens pooled). Tokens are removed for real; the layers keep SDPA. The
selection's elementwise products (``pivots x N x C`` multiply-adds, no matmul) are not in the FLOPs tables.

Paper (abstract, arXiv 2502.11494): DART "can prune 88.9% vision tokens while maintaining comparable
performance, leading to a 1.99x and 2.99x speed-up in total time and prefilling stage".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tokenprune.core.sequence import compact, top_per_row
from tokenprune.methods.vlm import (
    DecoderLayerContext,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
)
from tokenprune.registry import register_method


def _count(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 ({what}), got {value!r}")
    return value


@dataclass
class DARTConfig(VLMReductionConfig):
    """DART (Wen et al., 2025): after layer ``k``, keep the visual tokens least duplicated with a few pivots.

    Attributes:
        k: Layers that see every visual token (DART's K): layer ``k - 1``'s keys pick the pivots, its output
            hidden states measure duplication; layers ``k ..`` see only the kept tokens. ``1 <= k < depth``.
        keep: Fraction of visual tokens kept after layer ``k``, in [0, 1]; default 0.222 (DART's
            ``reduction_ratio`` 0.778: 128 of LLaVA-1.5's 576). Give ``keep`` or ``flops``, not both.
        pivot_image: Visual tokens with the largest key L1 norm taken as pivots (kept); default 4.
        pivot_text: Instruction tokens with the largest key L1 norm taken as pivots (never removed; a prompt
            with fewer uses all of them); default 4. ``pivot_image + pivot_text >= 1``.
        norm: Measure similarity on the language model's final norm of the hidden states (DART's code), or on
            the raw hidden states (False).
    """

    k: int = 2
    keep: float | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1 (layers that see every visual token), got {self.k!r}")
        self.pivot_image = _count("pivot_image", self.pivot_image, "visual pivot tokens")
        self.pivot_text = _count("pivot_text", self.pivot_text, "instruction pivot tokens")
        if self.pivot_image + self.pivot_text < 1:
            raise ValueError("pivot_image + pivot_text must be >= 1: DART needs a pivot to measure duplication")
        if not isinstance(self.norm, bool):
            raise TypeError(f"norm must be a bool, got {self.norm!r}")
        self.ratio_or_flops("keep", 0.222)


class DART(VisualTokenMethod):
    """Image pivots plus, per pivot, the visual tokens least similar to it, once, after layer ``k``."""

    name = "dart"
    identity = {"keep": 1.0}
    example = {"k": 2, "keep": 0.5, "pivot_image": 2, "pivot_text": 2}
    query_rows = "none"  # no attention rows: key norms and hidden-state similarity
    budget_parameter = "keep"

    def __init__(self, config: DARTConfig) -> None:
        super().__init__(config)
        self.final_norm: torch.nn.Module | None = None

    def validate(self, depth: int) -> None:
        if not 1 <= self.config.k < depth:
            raise ValueError(
                f"dart k={self.config.k} is out of range for a language model of {depth} layers: "
                f"1 <= k <= {depth - 1} (k layers see every visual token)"
            )

    def check_model(self, adapter: Any) -> None:
        super().check_model(adapter)
        if self.config.norm:
            self.final_norm = getattr(adapter.language_model, "norm", None)
            if not isinstance(self.final_norm, torch.nn.Module):
                raise TypeError(
                    f"dart norm=True measures similarity after the language model's final norm, but "
                    f"{type(adapter.language_model).__name__} has no .norm module; pass norm=False"
                )

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        keep = self.config.keep if value is None else value
        k = self.config.k
        return VisualPlan(1.0, tuple(1.0 if layer < k else keep for layer in range(depth)))

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        """1 for DART's kept visual tokens (exactly ``ctx.keep`` per sample), 0 for the others."""
        visual, keep = ctx.visual, ctx.keep  # (B, N), (B,)
        available = visual.sum(dim=1)
        whole = keep >= available  # nothing to choose: every visual token stays
        norms = ctx.keys.float().abs().sum(dim=(1, 3))  # (B, N) L1 norm of each key (before RoPE) over all heads
        rows, row_valid = ctx.text_rows()  # (B, T): the instruction
        text = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
        text = text.scatter_add(1, rows, row_valid.long()) > 0  # (B, N); fill rows point at real ones, add 0
        image_pivots = top_per_row(norms, visual, torch.minimum(keep, available).clamp(max=self.config.pivot_image))
        text_pivots = top_per_row(norms, text, torch.full_like(keep, self.config.pivot_text))
        slots, slot_valid = compact(image_pivots | text_pivots)  # (B, P) right-aligned, in sequence order
        pivots = slot_valid.sum(dim=1)
        rest = torch.where(whole, 0, keep - image_pivots.sum(dim=1))  # (B,) chosen by dissimilarity
        if bool(((rest > 0) & (pivots == 0)).any()):
            raise ValueError(
                "dart: a prompt has no pivot (pivot_image=0 and no instruction after its image); set pivot_image >= 1"
            )
        order = slot_valid.long().cumsum(dim=1) - 1  # (B, P) rank of each pivot in its sample
        shares = rest[:, None] // pivots.clamp(min=1)[:, None] + (order < (rest % pivots.clamp(min=1))[:, None])
        shares = torch.where(slot_valid, shares, 0)  # (B, P) tokens each pivot chooses

        hidden = ctx.hidden if self.final_norm is None else self.final_norm(ctx.hidden)
        hidden = hidden.float()  # (B, N, C)
        left = visual & ~image_pivots  # candidates
        for slot in range(slots.shape[1]):  # a few pivots; each sees what the earlier ones left
            pivot = hidden.gather(1, slots[:, slot, None, None].expand(-1, 1, hidden.shape[-1]))  # (B, 1, C)
            similarity = F.cosine_similarity(hidden, pivot, dim=-1)  # (B, N)
            chosen = top_per_row(-similarity, left, shares[:, slot])
            left = left & ~chosen
        kept = (visual & ~left) | (whole[:, None] & visual)  # pivots and every chosen token
        return kept.float()


register_method("dart", DARTConfig, DART)

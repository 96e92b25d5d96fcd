"""``cdpruner``: CDPruner (Zhang et al., NeurIPS 2025), "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs".

Before the LLM, each image keeps the ``K`` visual tokens a *conditional* determinantal point process finds most
diverse. The kernel is ``L = diag(q) S diag(q)``: ``S`` the cosine similarity of the image's tokens, ``q`` each
token's relevance to the instruction (the mean cosine between the token and the instruction's tokens, min-max
normalised over the image to ``(0, 1]``), so ``det L_Y`` rewards a set ``Y`` of tokens that are both relevant and
unlike each other. The MAP set is found greedily with the fast incremental-Cholesky algorithm of Chen et al.
(NeurIPS 2018): every step adds the token of largest residual gain ``d_j^2`` (the factor by which it multiplies
``det L_Y``), then shrinks every other token's gain by its new Cholesky entry. No attention is read, so the
vision tower and the LLM keep their fused attention; kept tokens are unmerged, in spatial order, removed for real.

Kept from the reference code (github.com/Theia-4869/CDPruner, ``llava/model/llava_arch.py``): the similarity
(cosine of the projected visual tokens, the ``mm_projector`` output, in float32); the relevance as the mean over
instruction tokens of the cosine, min-max normalised; the kernel ``q_i S_ij q_j`` with the plain relevance (the
reference's released setting) and, as an option, its commented-out trade-off ``q = exp(alpha r)`` with
``alpha = theta / (2 (1 - theta))``; the greedy and its stopping rule: exactly ``K`` picks (no early stop on a
small gain), kept tokens sorted back into spatial order.

Changed: (1) the instruction is the LLM's own input embeddings of the prompt's text after the image
(``PreLLMContext.text``; chat-template tokens after the image included, image-layout tokens excluded), and its
relevance is taken against the same projected visual tokens, both in the LLM's input space; the reference
encodes the raw question with CLIP's text tower and compares it with the CLIP-projected tower features, which
needs a CLIP text encoder that no other family's tower has (OpenVINO GenAI's port does as we do for Qwen2-VL).
(2) The reference negates the cosine before normalising, an effect its authors report for CLIP only (CDPruner
issue #14); in the LLM's space we default to the plain cosine (``relevance="similar"``), ``"dissimilar"``
restores the reference's sign. (3) The min-max range is per image (the reference's is over all images of the
call at once) and ``(c - min + eps) / (max - min + eps)``, so equal scores (or no instruction text at all) give
every token relevance 1 (a similarity-only DPP) instead of the reference's 0/0. (4) The mean of cosines is
computed as the cosine with the mean of the instruction's unit vectors (equal by linearity): one ``n x C``
matrix-vector product, so the cost does not grow with the prompt. (5) The greedy runs in float64 and stops
updating a span whose kernel is exhausted (best remaining gain <= ``1e-5`` of its largest diagonal entry: ``K``
beyond the kernel's rank, or duplicated tokens); its remaining picks go by relevance, highest first (the
reference divides by the root of a ~0 or negative gain there). (6) Spans of every prompt are selected together;
``tokens=N`` keeps an exact count per image; kept tokens keep their original positions unless
``merge_positions="compact"`` (the reference concatenates them).

Headline (arXiv 2506.10967, abstract): "When applied to LLaVA, CDPruner reduces FLOPs by 95% and CUDA latency by
78%, while maintaining 94% of the original accuracy"; the paper keeps 128, 64 or 32 of LLaVA-1.5's 576 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokenprune.methods.vlm import PreLLMConfig, PreLLMContext, PreLLMMethod, SpanReduction
from tokenprune.registry import register_method

DEFAULT_KEEP = 64 / 576  # the paper's middle LLaVA-1.5 setting (it reports 128, 64 and 32 of 576)
EPS = 1e-6  # the reference's epsilon in the relevance's min-max normalisation
EXHAUSTED = 1e-5  # residual gain, relative to a span's largest kernel entry, below which its DPP has no more to add
RELEVANCE = ("similar", "dissimilar")


@dataclass
class CDPrunerConfig(PreLLMConfig):
    """CDPruner (Zhang et al., NeurIPS 2025): keep each image's tokens of maximal instruction-conditioned diversity.

    Attributes:
        keep: Fraction of each image's visual tokens kept, in (0, 1] (1 = nothing pruned); default 64/576 (the
            paper's middle LLaVA-1.5 setting). Give one of ``keep``, ``tokens`` or ``flops``.
        tokens: Exact number of visual tokens kept per image, an int >= 1 (an image with fewer keeps all).
        theta: Relevance-diversity trade-off: None (the reference's setting) uses the normalised relevance ``r``
            itself as each token's quality; a number in [0, 1) uses ``exp(alpha r)``, ``alpha = theta / (2 (1 -
            theta))`` (0: relevance ignored, a similarity-only DPP; towards 1: relevance dominates).
        relevance: ``"similar"`` (a token is more relevant the higher its mean cosine to the instruction's
            embeddings) or ``"dissimilar"`` (the reference's negated cosine, which it uses for CLIP's spaces).
        merge_positions: ``"original"`` (each kept token keeps its position; later text too) or ``"compact"``
            (the reference: the LLM sees the prompt as if each image had fewer placeholders). Qwen2-VL's
            multi-axis positions need ``"original"``.
    """

    theta: float | None = None
    relevance: str = "similar"
    merge_positions: str = "original"
    default_keep: ClassVar[float] = DEFAULT_KEEP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None:
            if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
                raise TypeError(f"theta must be None or a number in [0, 1), got {self.theta!r}")
            if not 0.0 <= self.theta < 1.0:
                raise ValueError(f"theta must be None or a number in [0, 1), got {self.theta}")
            self.theta = float(self.theta)
        if self.relevance not in RELEVANCE:
            raise ValueError(f"relevance must be 'similar' or 'dissimilar', got {self.relevance!r}")
        if self.merge_positions not in ("original", "compact"):
            raise ValueError(f"merge_positions must be 'original' or 'compact', got {self.merge_positions!r}")


def instruction_relevance(
    embeds: torch.Tensor, text: torch.Tensor | None, text_valid: torch.Tensor | None, negate: bool = False
) -> torch.Tensor:
    """Relevance in ``(0, 1]`` of every token of ``S`` spans ``embeds`` ``(S, n, C)`` to their instructions.

    The mean cosine of each token to the valid rows of ``text`` ``(S, T, C)`` (``text_valid`` ``(S, T)``; None:
    all valid), negated if ``negate``, then ``(c - min + eps) / (max - min + eps)`` over the span. A span with no
    valid text row (or ``text`` None) gets relevance 1 everywhere.

    Returns:
        ``(S, n)`` float32.
    """
    spans, n, channels = embeds.shape
    if text is None:  # no instruction: the same computation on zero rows, so the FLOPs do not depend on it
        text = embeds.new_zeros(spans, 0, channels)
    if text_valid is None:
        text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    unit = F.normalize(embeds.float(), dim=-1)  # (S, n, C)
    words = F.normalize(text.float(), dim=-1) * text_valid[..., None]  # (S, T, C), padding rows zeroed
    rows = text_valid.sum(dim=1)  # (S,)
    centre = words.sum(dim=1) / rows.clamp(min=1)[:, None]  # (S, C) mean unit vector: mean_t cos = cos . mean_t
    cosine = (unit @ centre[..., None]).squeeze(-1)  # (S, n): one matrix-vector product, 2 n C per span
    cosine = -cosine if negate else cosine
    low, high = cosine.amin(dim=1, keepdim=True), cosine.amax(dim=1, keepdim=True)
    relevance = (cosine - low + EPS) / (high - low + EPS)
    return torch.where((rows > 0)[:, None], relevance, torch.ones((), device=embeds.device))


def conditional_kernel(embeds: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """``(S, n, n)`` float64 kernel ``q_i cos(x_i, x_j) q_j`` of ``S`` spans ``embeds`` ``(S, n, C)``, ``quality``
    ``(S, n)``."""
    unit = F.normalize(embeds.float(), dim=-1)  # (S, n, C)
    similarity = unit @ unit.transpose(1, 2)  # (S, n, n): the big matmul, 2 n^2 C per span, float32 as the reference
    quality = quality.double()
    return quality[:, :, None] * similarity.double() * quality[:, None, :]


def greedy_dpp(kernel: torch.Tensor, keep: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018) in each of ``S`` kernels ``(S, n, n)``.

    Step ``i`` picks the untaken token ``j`` of largest residual gain ``d_j^2`` and appends its Cholesky row
    ``e = (L_j - c_j^T C) / d_j`` (``C`` the ``i`` earlier rows), then ``d^2 -= e^2``. A span whose best gain is
    at most ``EXHAUSTED`` of its largest diagonal entry is done with: its rows stop updating and its remaining
    picks are its untaken tokens of largest diagonal (relevance), highest first.

    Returns:
        ``(S, keep)`` token positions, in the order they were picked.
    """
    spans, n, _ = kernel.shape
    device = kernel.device
    rows = torch.arange(spans, device=device)
    quality = kernel.diagonal(dim1=1, dim2=2)  # (S, n)
    gain = quality.clone()  # (S, n) residual gain d_j^2 of adding token j
    floor = EXHAUSTED * quality.amax(dim=1)  # (S,)
    factors = kernel.new_zeros(spans, max(keep - 1, 0), n)  # (S, K-1, n) the Cholesky rows of the picked tokens
    taken = torch.zeros(spans, n, dtype=torch.bool, device=device)
    order = []
    for step in range(keep):
        residual = gain.masked_fill(taken, float("-inf"))
        exhausted = residual.amax(dim=1) <= floor  # (S,)
        by_quality = quality.masked_fill(taken, float("-inf")).argmax(dim=1)
        picked = torch.where(exhausted, by_quality, residual.argmax(dim=1))  # (S,)
        taken[rows, picked] = True
        order.append(picked)
        if step == keep - 1:  # the last row is never read
            break
        row = kernel[rows, picked]  # (S, n)
        if step:
            earlier = factors[:, :step]  # (S, i, n)
            mine = earlier.gather(2, picked[:, None, None].expand(-1, step, 1))  # (S, i, 1) the picked token's column
            row = row - (mine.transpose(1, 2) @ earlier).squeeze(1)  # (S, n): 2 i n per span
        scale = gain[rows, picked].clamp(min=torch.finfo(gain.dtype).tiny).sqrt()  # (S,)
        factor = torch.where(exhausted[:, None], torch.zeros((), dtype=row.dtype, device=device), row / scale[:, None])
        factors[:, step] = factor
        gain = gain - factor.square()
    return torch.stack(order, dim=1)


class CDPruner(PreLLMMethod):
    """Keep each image's tokens of maximal instruction-conditioned diversity (conditional DPP), before the LLM."""

    name = "cdpruner"
    identity = {"keep": 1.0}
    example = {"keep": 0.25}
    batch_invariant = True
    reads_text = True

    def quality(self, ctx: PreLLMContext) -> torch.Tensor:
        """``(S, n)`` each token's DPP quality: its relevance, or ``exp(alpha relevance)`` with ``theta``."""
        relevance = instruction_relevance(ctx.embeds, ctx.text, ctx.text_valid, self.config.relevance == "dissimilar")
        theta = self.config.theta
        return relevance if theta is None else torch.exp(theta / (2.0 * (1.0 - theta)) * relevance)

    def merge(self, ctx: PreLLMContext) -> SpanReduction:
        picked = greedy_dpp(conditional_kernel(ctx.embeds, self.quality(ctx)), ctx.keep)  # (S, K)
        chosen = torch.zeros(ctx.embeds.shape[:2], device=ctx.embeds.device).scatter_(1, picked, 1.0)  # (S, n)
        return ctx.select(chosen)  # exactly K ones per span: the picked set, in spatial order

    def merge_flops(self, tokens: int, keep: int, channels: int) -> float:
        # The cosine Gram (n x C @ C x n), the relevance's mat-vec (n x C @ C x 1: independent of the prompt's
        # length), and the greedy's c_j^T C products at steps 1 .. K-2 (sum of 2 i n = n (K-1)(K-2)).
        return 2.0 * tokens * tokens * channels + 2.0 * tokens * channels + tokens * (keep - 1) * (keep - 2)


register_method("cdpruner", CDPrunerConfig, CDPruner)

"""``sparsevlm``: SparseVLM (Zhang et al., ICML 2025), "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference".

Text *raters* rate the visual tokens, the visual tokens are pruned in stages inside the LLM, and the pruned ones
are partly *recycled* into a few merged tokens instead of being dropped:

a) Raters: the instruction's text tokens (after the first image) most relevant to the image. From what entered
   the LLM, ``R = softmax_text(V T^T)`` (``V``: visual embeddings, ``T``: text embeddings, softmax over the text
   tokens), averaged over the visual tokens; a text token rates if its relevance is above the mean.
b) Scores: at each pruning layer, the attention the raters pay to every visual token (the layer's softmax,
   averaged over heads and raters).
c) Counts: stages after layers 2, 6 and 15 of 32 (scaled to the LLM's depth, the first not before layer 1 where
   the depth allows; or ``layers``); each stage keeps
   the top-scored tokens: the released per-setting schedule for ``retain`` = 192 / 128 / 96 / 64 tokens
   (their v1.5 ``score.py``: e.g. 300, 200, 110 of 576 for 192), or a geometric ``ratio`` per stage.
d) Recycling: of the tokens a stage prunes, the ``recycle`` fraction (30%, +1) the raters attend to most are
   clustered by density peaks (DPC-kNN on the layer's output hidden states, ``clusters`` x that count + 1 clusters,
   the k nearest neighbours with k = the cluster count), and each cluster becomes one token: the mean of its
   members' hidden states. The rest are dropped. Recycled tokens count among the visual tokens of the next
   layers (and compete at the next stage), as in their code.

What is kept from their code (``Gumpest/SparseVLMs``: ``modelling_sparse_llama.py``, ``score.py``, ``utils.py``):
rater selection as in (a) from the input embeddings, rater-attention scoring, the pruning layers, the released
schedules, the 30% / one-tenth recycling rule, DPC-kNN with their density and distance-to-denser-token score,
and an unweighted mean per cluster. The paper's adaptive rank-based count is not in their released code (rank is
fixed at 0, the counts come from the schedules), so it is not here either.

What is changed:

* Counts are fractions of each prompt's visual tokens (their counts are of LLaVA-1.5's 576), so any family and
  image layout gets the same schedule shape; ``retain`` names the setting, not an absolute count.
* The rater attention is recomputed in float32 for the instruction's rows only, from the layer's own
  rotary-embedded queries and keys (all instruction rows are scored, raters weigh in); the layer keeps SDPA.
  Their code materialises the whole attention map.
* Tokens are removed for real, with compact KV caches and batch > 1 (theirs: batch 1). Kept tokens keep their
  rotary positions, and each recycled token is stored at its cluster centre's slot with that token's position
  (theirs renumbers positions and appends recycled tokens after the kept ones).
* Deterministic clustering: ties in density go to the earlier token (theirs adds random noise of 1e-6);
  distances come from one Gram product; the cluster mean divides by the member count (theirs adds 1e-6).
* ``flops=`` solves the geometric ``ratio`` per prompt (their schedules are fixed per setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenprune.methods.vlm import (
    DecoderLayerContext,
    Recycling,
    VisualPlan,
    VisualTokenMethod,
    VLMReductionConfig,
    check_fraction,
    instruction_mask,
)
from tokenprune.registry import register_method

#: Their released schedules (v1.5 ``score.py``): visual tokens kept after each stage, of LLaVA-1.5's 576.
SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
REFERENCE_TOKENS = 576
#: Their pruning layers (``pruning_loc``) on LLaVA-1.5-7B's 32 layers: the layers whose output is pruned.
REFERENCE_LAYERS, REFERENCE_DEPTH = (2, 6, 15), 32


@dataclass
class SparseVLMConfig(VLMReductionConfig):
    """SparseVLM (Zhang et al., ICML 2025): rater-guided pruning in stages, pruned tokens partly recycled.

    Attributes:
        retain: Their setting: one of 192, 128, 96, 64 (visual tokens of 576 their schedule keeps; here as
            fractions of each prompt's visual tokens); the default (192) when none of ``retain``, ``ratio``,
            ``flops`` is given. Give one of the three.
        ratio: Instead of ``retain``: each stage keeps this fraction of the visual tokens the previous stage kept
            (a geometric schedule), in [0, 1]; 1.0 prunes nothing.
        layers: Layers after which a stage prunes (strictly increasing, each ``< depth - 1``); default: their
            2, 6, 15 of 32 scaled to the LLM's depth. With ``retain``, three layers (one per schedule entry).
        recycle: Fraction of a stage's pruned tokens recycled (the most attended; their 0.3, plus one), in
            [0, 1]; 0 drops every pruned token.
        clusters: Recycled tokens per recycled candidate (their 0.1, plus one), in (0, 1].
    """

    retain: int | None = None
    ratio: float | None = None
    layers: tuple[int, ...] | None = None
    recycle: float = 0.3
    clusters: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [name for name in ("retain", "ratio", "flops") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of retain, ratio or flops, not {' and '.join(given)}")
        if self.retain is not None and (isinstance(self.retain, bool) or self.retain not in SCHEDULES):
            raise ValueError(f"retain must be one of {sorted(SCHEDULES)} (their settings), got {self.retain!r}")
        if self.ratio is not None:
            self.ratio = check_fraction("ratio", self.ratio, False)
        if not given:
            self.retain = 192
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise TypeError(f"layers must be a list of ints (layers after which a stage prunes), got {layers!r}")
            layers = tuple(layers)
            if not layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
                raise TypeError(f"layers must be a non-empty list of ints, got {self.layers!r}")
            if layers[0] < 0 or any(b <= a for a, b in zip(layers[:-1], layers[1:], strict=True)):
                raise ValueError(f"layers must be strictly increasing layer indices >= 0, got {list(layers)}")
            if self.retain is not None and len(layers) != len(SCHEDULES[self.retain]):
                raise ValueError(
                    f"retain={self.retain} has {len(SCHEDULES[self.retain])} stages; give that many layers, "
                    f"got {list(layers)} (or use ratio= for another number of stages)"
                )
            self.layers = layers
        self.recycle = check_fraction("recycle", self.recycle, False)
        self.clusters = check_fraction("clusters", self.clusters, True)


def density_peaks(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN: ``k`` cluster centres of ``x`` ``(n, C)`` and the cluster of every token.

    A token's density is ``exp(-mean d^2)`` over its ``k`` nearest tokens (itself included, distances scaled by
    ``sqrt(C)``); its score is that density times the distance to the nearest denser token (the largest distance
    for the densest). The ``k`` best-scored tokens are the centres; every token joins its nearest centre.

    Returns:
        ``(centres (k,), assign (n,))``: centres as indices into ``x``, ``assign`` in ``0 .. k-1``.
    """
    n, channels = x.shape
    squares = (x * x).sum(dim=-1)
    gram = x @ x.T  # (n, n): the one matmul (counted by pruning_flops)
    dist = (squares[:, None] + squares[None, :] - 2 * gram).clamp(min=0).sqrt() / math.sqrt(channels)
    dist.fill_diagonal_(0)
    density = (-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()  # (n,)
    ids = torch.arange(n, device=x.device)
    # Denser: higher density, ties to the earlier token (deterministic, where their code adds noise).
    other, own = density[None, :], density[:, None]  # (1, n), (n, 1): [i, j] compares token j with token i
    denser = (other > own) | ((other == own) & (ids[None, :] < ids[:, None]))
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = (delta * density).argsort(descending=True, stable=True)[:k]
    assign = dist[:, centres].argmin(dim=-1)
    assign[centres] = torch.arange(k, device=x.device)  # a centre joins its own cluster
    return centres, assign


class SparseVLM(VisualTokenMethod):
    """Rater-attention pruning in stages; the most attended pruned tokens are clustered into recycled tokens."""

    name = "sparsevlm"
    identity = {"ratio": 1.0}
    example = {"ratio": 0.5}
    query_rows = "text"
    budget_parameter = "ratio"
    reads_inputs = True

    # ------------------------------------------------------------------ counts
    def pruning_layers(self, depth: int) -> tuple[int, ...]:
        """Layers after which a stage prunes: their 2, 6, 15 of 32 scaled to ``depth``, kept distinct, and the first
        never before layer 1 where the depth leaves room for the three (depth >= 5): scaled down to a shallow LLM,
        layer 2 of 32 would be layer 0, whose attention ranks visual tokens poorly (llava-easyvqa, 8 layers,
        ratio=0.5, 200 easy-VQA *train* questions: stages after layers 0/2/4 answer 72.0% right, after 1/2/4
        97.0%; ``python eval/check_sparsevlm_first_layer.py``)."""
        if self.config.layers is not None:
            return tuple(self.config.layers)
        layers: list[int] = []
        for layer in REFERENCE_LAYERS:
            lowest = layers[-1] + 1 if layers else int(depth >= len(REFERENCE_LAYERS) + 2)
            layers.append(max(round(layer * depth / REFERENCE_DEPTH), lowest))
        return tuple(layers)

    def validate(self, depth: int) -> None:
        layers = self.pruning_layers(depth)
        if layers[-1] > depth - 2:
            raise ValueError(
                f"sparsevlm layers {list(layers)} are out of range for a language model of {depth} layers: a stage "
                f"prunes after a layer in 0 .. {depth - 2} (some layer must see what it keeps)"
            )

    def stage_fractions(self, stages: int, value: float | None = None) -> list[float]:
        """Fraction of the visual tokens each stage keeps (``value``: a ``ratio`` overriding the config)."""
        if value is None and self.config.retain is not None:
            return [kept / REFERENCE_TOKENS for kept in SCHEDULES[self.config.retain]]
        ratio = self.config.ratio if value is None else value
        return [ratio ** (stage + 1) for stage in range(stages)]

    def plan_for(self, depth: int, value: float | None = None) -> VisualPlan:
        layers = self.pruning_layers(depth)
        stages = self.stage_fractions(len(layers), value)
        fractions, current = [], 1.0
        for layer in range(depth):
            fractions.append(current)
            if layer in layers:
                current = min(current, stages[layers.index(layer)])
        return VisualPlan(1.0, tuple(fractions), self.recycled_count if self.config.recycle > 0 else None)

    def candidate_count(self, pruned: int) -> int:
        """Pruned tokens considered for recycling: the ``recycle`` fraction, plus one (theirs: 30% + 1)."""
        return min(pruned, int(self.config.recycle * pruned + 1e-9) + 1) if pruned else 0

    def recycled_count(self, pruned: int) -> int:
        """Recycled tokens a stage pruning ``pruned`` tokens makes (clusters of the candidates)."""
        candidates = self.candidate_count(pruned)
        return min(candidates, int(self.config.clusters * candidates + 1e-9) + 1) if candidates else 0

    # ------------------------------------------------------------------ scoring
    def raters(self, ctx: DecoderLayerContext) -> torch.Tensor:
        """``(B, N)`` the current tokens that rate (text tokens of the instruction relevant to the image)."""
        inputs = ctx.inputs
        text = instruction_mask(inputs.valid, inputs.visual, inputs.structural)  # (B, L)
        visual = inputs.valid & inputs.visual
        length = int(max(inputs.index.max(), ctx.index.max())) + 1  # input positions
        rating = torch.zeros(ctx.valid.shape[0], length, dtype=torch.bool, device=ctx.valid.device)
        for b in range(text.shape[0]):  # one sample at a time: each its own counts (and exact FLOPs)
            if not (text[b].any() and visual[b].any()):
                continue
            v, t = inputs.embeds[b, visual[b]].float(), inputs.embeds[b, text[b]].float()  # (V, C), (T, C)
            relevance = (v @ t.T).softmax(dim=-1).mean(dim=0)  # (T,)
            chosen = relevance > relevance.mean()
            if not chosen.any():  # every text token equally relevant: all rate
                chosen = torch.ones_like(chosen)
            rating[b, inputs.index[b, text[b]][chosen]] = True
        return rating.gather(1, ctx.index.clamp(min=0)) & ctx.valid

    def importance(self, ctx: DecoderLayerContext) -> torch.Tensor:
        rows, row_valid = ctx.text_rows()  # (B, T): the instruction
        weight = (self.raters(ctx).gather(1, rows) & row_valid).float()  # (B, T) 1 for raters
        probs = ctx.attention_rows(rows, row_valid)  # (B, T, N)
        return (probs * weight[..., None]).sum(dim=1) / weight.sum(dim=1, keepdim=True).clamp(min=1)

    # ------------------------------------------------------------------ recycling
    def recycle(
        self, ctx: DecoderLayerContext, scores: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor
    ) -> Recycling:
        pruned = ctx.valid & ctx.visual & ~keep  # (B, N)
        batch, n = pruned.shape
        hidden = ctx.hidden
        made = counts.tolist()
        group = torch.full((batch, n), -1, dtype=torch.long, device=pruned.device)
        stored = torch.full((batch, max(made)), -1, dtype=torch.long, device=pruned.device)
        merged = torch.zeros(batch, max(made), hidden.shape[-1], device=pruned.device)
        for b, k in enumerate(made):
            if not k:
                continue
            positions = pruned[b].nonzero().squeeze(1)  # (P,) ascending
            order = scores[b, positions].argsort(descending=True, stable=True)
            candidates = positions[order[: self.candidate_count(len(positions))]].sort().values  # (c,) in order
            x = hidden[b, candidates].float()  # (c, C)
            centres, assign = density_peaks(x, k)
            group[b, candidates] = assign
            stored[b, :k] = candidates[centres]
            sums = torch.zeros(k, x.shape[-1], device=x.device).index_add_(0, assign, x)
            members = torch.bincount(assign, minlength=k).to(x.dtype)
            merged[b, :k] = sums / members[:, None]
        return Recycling(group, stored, merged)

    def pruning_flops(self, layer: int, visual: list[int], recycled: list[int], rows: int, channels: int) -> float:
        flops = 2.0 * visual[0] * rows * channels  # rater relevance: (V x C) @ (C x T)
        made = recycled[layer + 1]
        if made:
            pruned = visual[layer] - (visual[layer + 1] - made)
            flops += 2.0 * self.candidate_count(pruned) ** 2 * channels  # the clustering's Gram product
        return flops


register_method("sparsevlm", SparseVLMConfig, SparseVLM)

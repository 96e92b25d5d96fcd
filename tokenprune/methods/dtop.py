"""``dtop``: Dynamic Token Pruning for semantic segmentation (Tang et al., ICCV 2023), early exit per token.

At each stage boundary of a :class:`tokenprune.zoo.camvid.ViTSegmenter` (``exit_after``), the boundary's
auxiliary head grades every token still in the sequence. Tokens whose top class probability reaches
``threshold`` exit: that aux prediction is their final one and they leave the sequence for all later
blocks (real removal). The ``keep_top_k`` most confident tokens of each predicted class stay, so later
blocks keep context of every class. The final head predicts the tokens that never exit, and the output
map is reassembled in original token positions. This module holds the options and the exit rule
(:func:`tokenprune.core.early_exit.select_exits`); the segmenter adapter
(:mod:`tokenprune.adapters.dense.segmenter`) runs the blocks, owns padding and masks, and reassembles the map.

    patch = tokenprune.apply(segmenter, "dtop", threshold=0.95, keep_top_k=5)
    logits = segmenter(images)              # (B, K, h, w), same shape as without dtop
    patch.state.exit_stage                  # (B, h*w): 0.. = exited at exit_after[s], S = final head

**FLOPs budget** (our addition; the paper has thresholds only, so its saving moves with the images): with
``quota=[q_0, ...]`` exactly ``round(q_s * M)`` of an image's ``M`` patch tokens exit at boundary ``s``, the
most confident ones (keep-top-k tokens rank last; :func:`~tokenprune.core.early_exit.select_quota_exits`), so
every image costs the same FLOPs, known at apply time. ``flops=0.65`` solves a quota for that fraction of the
unreduced FLOPs (the same share of the live tokens exits at every boundary), and
``tokenprune.calibrate(segmenter, "dtop", flops=0.65, images=train_images)`` instead picks, among quotas of
that cost, how the exits split across boundaries, by the KL divergence of the per-token class distributions
from the unreduced model's on the given images (:func:`calibrate_budget`; a grid over the split, seeded by
nothing random). ``patch.runtime.method.counts`` holds the exact counts.

    patch = tokenprune.apply(segmenter, "dtop", flops=0.65)      # or quota=[0.3, 0.15]
    config = tokenprune.calibrate(segmenter, "dtop", flops=0.65, images=train_images)  # {"quota": [...], ...}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.config import ReductionConfig
from tokenprune.core.early_exit import (
    quota_counts,
    select_exits,
    select_quota_exits,
    shaped_exit_counts,
    solve_exit_counts,
)
from tokenprune.methods.dense import EarlyExitMethod, ExitContext
from tokenprune.registry import register_method

#: Threshold when neither a threshold nor a budget is given.
DEFAULT_THRESHOLD = 0.95


@dataclass
class DToPConfig(ReductionConfig):
    """DToP early exit.

    Attributes:
        threshold: A token exits at a stage boundary when its aux head's top class probability is at
            least this; any number > 0 (values above 1 disable exits: the exact unpruned prediction), or a
            list with one such number per exit stage (e.g. stricter at the earliest, weakest head). Default
            0.95; not allowed with ``quota`` or ``flops``.
        keep_top_k: Per image and class, the k most confident live tokens never exit (an int >= 0); with a
            budget they are the last to exit (only when the quota needs them).
        quota: Instead of a threshold: per exit stage, the fraction in [0, 1] of the image's patch tokens
            that exit there (the most confident ones), summing to at most 1; exact counts per image.
        flops: Instead of a threshold: target FLOPs as a fraction of the unreduced segmenter, solved into a
            quota at apply time (the same share of live tokens exits at every boundary).
    """

    threshold: float | list[float] | None = None
    keep_top_k: int = 5
    quota: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (isinstance(self.r, int) and self.r) or (isinstance(self.r, list) and any(self.r)):
            raise ValueError(
                "method 'dtop' has no per-layer schedule r: tokens exit by confidence; set threshold (> 0), "
                "a per-stage quota (fractions in [0, 1]) or flops (in (0, 1]) instead"
            )
        budgeted = [name for name in ("quota", "flops") if getattr(self, name) is not None]
        if len(budgeted) == 2:
            raise ValueError("give either quota (per-stage exit fractions) or flops (a FLOPs fraction), not both")
        if budgeted and self.threshold is not None:
            raise ValueError(
                f"threshold and {budgeted[0]} exclude each other: with a budget exactly the quota's most "
                "confident tokens exit, whatever their confidence; drop threshold"
            )
        if self.quota is not None:
            self.quota = _check_quota(self.quota)
        elif not budgeted:
            self.threshold = _check_threshold(DEFAULT_THRESHOLD if self.threshold is None else self.threshold)
        if isinstance(self.keep_top_k, bool) or not isinstance(self.keep_top_k, int) or self.keep_top_k < 0:
            raise ValueError(
                f"keep_top_k must be an int >= 0 (tokens per class that never exit), got {self.keep_top_k!r}"
            )


def _check_threshold(threshold: Any) -> float | list[float]:
    values = threshold if isinstance(threshold, (list, tuple)) else [threshold]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                "threshold must be a number > 0 (max class probability to exit) or a list of them, one per "
                f"exit stage; got {threshold!r}"
            )
        if not value > 0 or value != value:
            raise ValueError(
                f"threshold must be > 0 (max class probability to exit; > 1 disables exits), got {threshold}"
            )
    if not values:
        raise ValueError("threshold must be a number > 0 or a non-empty list of them (one per exit stage)")
    return [float(v) for v in values] if isinstance(threshold, (list, tuple)) else float(values[0])


def _check_quota(quota: Any) -> list[float]:
    valid = "quota must be a non-empty list of fractions in [0, 1] (one per exit stage) summing to at most 1"
    if not isinstance(quota, (list, tuple)) or not quota:
        raise TypeError(f"{valid}; got {quota!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in quota):
        raise TypeError(f"{valid}; got {quota!r}")
    if any(not 0.0 <= v <= 1.0 for v in quota) or sum(quota) > 1.0 + 1e-9:
        raise ValueError(f"{valid}; got {list(quota)} (sum {sum(quota):.4g})")
    return [float(v) for v in quota]


class DToP(EarlyExitMethod):
    """Early exit by aux-head confidence; runs only on segmenters with exit heads (the adapter's forward)."""

    name = "dtop"
    identity = {"threshold": 2.0}
    example = {"threshold": 0.6, "keep_top_k": 1}

    def __init__(self, config: DToPConfig) -> None:
        super().__init__(config)
        #: Exact patch tokens exiting per stage under a budget (None: threshold mode); set by check_model.
        self.counts: list[int] | None = None

    def check_model(self, adapter: Any) -> None:
        """One threshold / quota per exit stage of the segmenter; a flops budget solved into exact counts."""
        exits, config = adapter.exit_after, self.config
        for name in ("threshold", "quota"):
            value = getattr(config, name)
            if isinstance(value, list) and len(value) != len(exits):
                raise ValueError(
                    f"{name} list {value} has {len(value)} entries; this segmenter has {len(exits)} exit stages "
                    f"(exit_after={exits}): give "
                    + ("one number, or one per stage" if name == "threshold" else "one per stage")
                )
        if config.quota is not None:
            self.counts = quota_counts(config.quota, adapter.num_patches)
        elif config.flops is not None:
            self.counts = solve_exit_counts(config.flops, adapter.num_patches, len(exits), budget_cost(adapter))

    def exits(self, ctx: ExitContext) -> torch.Tensor:
        """Tokens at least ``threshold`` confident exit, except the ``keep_top_k`` most confident per class.

        Under a budget: exactly the stage's count of the most confident live tokens exits.
        """
        if self.counts is not None:
            return select_quota_exits(ctx.logits, ctx.valid, self.counts[ctx.stage], self.config.keep_top_k)
        threshold = self.config.threshold
        if isinstance(threshold, list):
            threshold = threshold[ctx.stage]
        return select_exits(ctx.logits, ctx.valid, threshold, self.config.keep_top_k)

    @staticmethod
    def calibrate_budget(*args: Any, **kwargs: Any) -> Any:
        """``tokenprune.calibrate`` for dtop: :func:`calibrate_budget`."""
        return calibrate_budget(*args, **kwargs)


def budget_cost(adapter: Any) -> Any:
    """Relative FLOPs of per-stage exit counts on ``adapter``'s segmenter (a callable for the solvers)."""
    dense = adapter.dense_flops()
    return lambda counts: adapter.planned_flops(counts) / dense


def share_grid(num_stages: int, steps: int) -> list[tuple[float, ...]]:
    """Every split of the exiting tokens across ``num_stages`` boundaries in multiples of ``1 / steps``."""
    points = [c for c in itertools.product(range(steps + 1), repeat=num_stages) if sum(c) == steps]
    return [tuple(v / steps for v in c) for c in points]


@torch.no_grad()
def calibrate_budget(
    model: Any,
    flops: float,
    images: torch.Tensor,
    seed: int = 0,
    *,
    max_evals: int = 12,
    batch_size: int = 8,
    progress: bool = True,
    **options: Any,
) -> Any:
    """The quota at ``flops`` whose outputs diverge least from the unreduced segmenter's on ``images``.

    Candidates: the default split (:func:`~tokenprune.core.early_exit.solve_exit_counts`), then the splits of
    :func:`share_grid` with the finest step that fits ``max_evals``, each solved to the budget
    (:func:`~tokenprune.core.early_exit.shaped_exit_counts`); identical counts are scored once. Objective:
    mean over every image's patch tokens of ``KL(p_unreduced || p_dtop)``.

    Args:
        model: An unpatched :class:`~tokenprune.zoo.camvid.ViTSegmenter` in eval mode.
        flops: FLOPs budget in (0, 1], fraction of the unreduced segmenter.
        images: ``(N, 3, H, W)`` calibration images (e.g. from the train split; never the split you report).
        seed: Recorded only: the grid is deterministic.
        max_evals: Quotas scored at most (>= 1); each is one forward over the images.
        batch_size: Images per forward.
        progress: Show a tqdm bar.
        **options: ``keep_top_k`` (the only other option a budget takes).

    Returns:
        A :class:`tokenprune.calibrate.Calibration`; ``constant_schedule`` holds the default split's counts
        and ``config`` is ``{"quota": [...], "keep_top_k": k}`` for ``tokenprune.apply``.

    Raises:
        ValueError: A budget outside what early exit reaches, ``max_evals < 1``, or options other than
            ``keep_top_k``.
    """
    from tokenprune.adapters.dense.segmenter import SegmenterAdapter
    from tokenprune.api import apply
    from tokenprune.calibrate import Calibration, divergence
    from tokenprune.optional import require

    extra = sorted(set(options) - {"keep_top_k"})
    if extra:
        raise ValueError(f"calibrate chooses dtop's quota itself: drop {extra} (it takes only keep_top_k)")
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0.0 < float(flops) <= 1.0:
        raise ValueError(f"flops budget must be a number in (0, 1] (fraction of the unreduced FLOPs), got {flops!r}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be an int >= 1, got {max_evals!r}")
    keep_top_k = DToPConfig(flops=float(flops), **options).keep_top_k  # validates keep_top_k
    adapter = SegmenterAdapter(model)
    cost, patches, stages = budget_cost(adapter), adapter.num_patches, len(adapter.exit_after)

    def readout(patch_options: dict[str, Any] | None) -> torch.Tensor:
        patch = apply(model, "dtop", **patch_options) if patch_options is not None else None
        try:
            out = [model(images[i : i + batch_size]).float() for i in range(0, images.shape[0], batch_size)]
        finally:
            if patch is not None:
                patch.remove()
        logits = torch.cat(out)  # (N, K, h, w)
        return logits.flatten(2).transpose(1, 2).reshape(-1, logits.shape[1])  # (N * h * w, K)

    reference = readout(None)
    start = solve_exit_counts(float(flops), patches, stages, cost)
    candidates = [start]
    steps = max((s for s in range(1, 21) if len(share_grid(stages, s)) <= max_evals - 1), default=0)
    for shares in share_grid(stages, steps) if steps else []:
        counts = shaped_exit_counts(float(flops), shares, patches, cost)
        if counts is not None and counts not in candidates:
            candidates.append(counts)
    tqdm = require("tqdm.auto", "eval", "progress bars").tqdm
    scores: list[float] = []
    for counts in tqdm(candidates[:max_evals], desc=f"calibrate dtop flops={flops}", disable=not progress):
        quota = [c / patches for c in counts]
        scores.append(divergence(readout({"quota": quota, "keep_top_k": keep_top_k}), reference, "kl"))
    best = min(range(len(scores)), key=scores.__getitem__)
    return Calibration(
        method="dtop",
        config={"quota": [c / patches for c in candidates[best]], "keep_top_k": keep_top_k},
        flops=float(flops),
        flops_ratio=cost(candidates[best]),
        constant_schedule=list(start),
        constant_flops_ratio=cost(start),
        divergence=scores[best],
        constant_divergence=scores[0],
        objective="kl",
        images=int(images.shape[0]),
        evaluations=len(scores),
        seed=seed,
    )


register_method("dtop", DToPConfig, DToP)

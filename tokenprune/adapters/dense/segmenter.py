"""Adapter for :class:`tokenprune.zoo.camvid.ViTSegmenter`: early exit (``dtop``) and dense baselines.

Two ways to reduce a segmenter's tokens, both with exact undo (the only change to the model is an instance
``forward`` attribute, plus the timm block wrappers for the second):

* an early-exit method (:class:`tokenprune.methods.dense.EarlyExitMethod`, e.g. ``dtop``): the adapter's own
  forward runs the backbone's original blocks on a padded batch. At every ``exit_after`` boundary the aux
  head grades the live tokens and the method says which exit (their aux prediction is final); the rest are
  packed to the front of each row, and padded keys get an additive ``-inf`` attention bias, so each image's
  tokens only attend to its own live tokens. The final map is reassembled in original token positions.
* any ViT method (``tome``, ``random``, ``none``, ...): the backbone is reduced by the timm adapter as for
  a classifier (with source tracking on), then every original token takes the final feature of the token
  that holds it (its merged group); a token pruned outright takes its nearest surviving token's feature.
  The head then predicts the full grid.

FLOPs (2 x MAC of matmuls/convolutions, per image): the dense forms count the final head on the full grid;
early exit counts each image's own live tokens per block, the aux heads on the tokens they grade and the final
head on the tokens that reach it (:meth:`SegmenterAdapter.early_exit_flops`). Padding a batch costs real
compute that the per-image figures leave out; ``torch.utils.flop_counter`` on a batch of one matches them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from tokenprune.adapters.base import Adapter, linear_macs
from tokenprune.adapters.vit.timm import TimmViTAdapter
from tokenprune.core.early_exit import compact, key_padding_bias, scatter_rows
from tokenprune.methods.base import Method
from tokenprune.methods.dense import EarlyExitMethod, ExitContext
from tokenprune.registry import register_adapter
from tokenprune.state import LayerLog


def _is_segmenter(model: Any) -> bool:
    from tokenprune.zoo.camvid import ViTSegmenter

    return isinstance(model, ViTSegmenter)


@dataclass
class EarlyExitState:
    """Bookkeeping of one early-exit forward (``patch.state``).

    Attributes:
        exit_stage: ``(B, M)`` per original patch token: ``s`` = exited after ``exit_after[s]`` blocks,
            ``len(exit_after)`` = predicted by the final head.
        predictions: ``(B, M)`` how many predictions were written per token (1 for every token).
        tokens_in: ``(B, depth)`` live tokens (prefix included) entering each block, per image.
        graded: ``(B, S)`` live patch tokens each aux head graded, per image.
        final_tokens: ``(B,)`` patch tokens the final head predicted.
        exit_after: Block counts of the stage boundaries.
        log: One :class:`LayerLog` per block with the padded batch length (what the batch computed).
    """

    exit_stage: torch.Tensor
    predictions: torch.Tensor
    tokens_in: torch.Tensor
    graded: torch.Tensor
    final_tokens: torch.Tensor
    exit_after: tuple[int, ...]
    log: list[LayerLog] = field(default_factory=list)

    def tokens_per_layer(self, image: int = 0) -> list[tuple[int, int]]:
        """``(tokens_in, tokens_out)`` per block for one image (out = what enters the next block)."""
        counts = self.tokens_in[image].tolist()
        prefix_and_final = counts[0] - self.exit_stage.shape[1] + int(self.final_tokens[image])
        return list(zip(counts, counts[1:] + [prefix_and_final], strict=True))


class SegmenterAdapter(Adapter):
    """A :class:`~tokenprune.zoo.camvid.ViTSegmenter` (timm ViT backbone + linear exit heads)."""

    kind = "dense"
    description = "tokenprune.zoo.camvid.ViTSegmenter"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.inner = TimmViTAdapter(model.backbone)
        for name in ("depth", "num_protected", "has_class_token", "has_static_size", "num_heads", "head_dim"):
            setattr(self, name, getattr(self.inner, name))
        self._check_heads(model)
        self.grid = tuple(model.grid_size)
        self.exit_after: tuple[int, ...] = tuple(model.exit_after)
        self.num_patches = self.grid[0] * self.grid[1]
        self._runtime: Any = None
        self._inner_installed = False

    def _check_heads(self, model: nn.Module) -> None:
        dim, classes, depth = model.backbone.embed_dim, model.num_classes, self.depth
        exits = tuple(model.exit_after)
        if not exits or list(exits) != sorted(set(exits)) or not all(0 < e < depth for e in exits):
            raise ValueError(
                f"segmenter exit_after must be strictly increasing block counts in 1..{depth - 1}, got {exits}"
            )
        if len(model.aux_heads) != len(exits):
            raise ValueError(
                f"segmenter has {len(model.aux_heads)} aux heads for exit_after={exits}: "
                f"it needs exactly one per exit ({len(exits)})"
            )
        for name, head in [("head", model.head)] + [(f"aux_heads[{i}]", h) for i, h in enumerate(model.aux_heads)]:
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if len(linears) != 1 or (linears[0].in_features, linears[0].out_features) != (dim, classes):
                shapes = [(m.in_features, m.out_features) for m in linears]
                raise ValueError(
                    f"segmenter {name} has linear layers {shapes}; every head must be one linear map "
                    f"embed_dim={dim} -> num_classes={classes} (LinearSegHead)"
                )

    # ----------------------------------------------------------------- FLOPs
    def num_tokens(self, input_size: tuple[int, int] | None = None) -> int:
        return self.inner.num_tokens(input_size)

    def embed_flops(self, num_tokens: int) -> float:
        return self.inner.embed_flops(num_tokens)

    def layer_flops(self, layer: int, tokens_in: int, tokens_out: int) -> float:
        return self.inner.layer_flops(layer, tokens_in, tokens_out)

    def head_flops(self, num_tokens: int) -> float:
        # Dense forms unmerge to the full grid before the final head.
        return 2.0 * self.num_patches * linear_macs(self.model.head)

    def early_exit_flops(self, state: EarlyExitState) -> torch.Tensor:
        """Per-image FLOPs ``(B,)`` of an early-exit forward from its own live-token counts (no padding)."""
        return self._exit_flops(state.tokens_in.double(), state.graded.double(), state.final_tokens.double())

    def _exit_flops(self, tokens_in: torch.Tensor, graded: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """FLOPs ``(B,)`` from live tokens entering each block ``(B, depth)`` (prefix included), the patch
        tokens each aux head graded ``(B, S)`` and those the final head predicted ``(B,)``."""
        model = self.model
        total = torch.full_like(tokens_in[:, 0], self.embed_flops(self.num_protected + self.num_patches))
        for layer in range(self.depth):
            n = tokens_in[:, layer]
            attn_linear, attn_dim, mlp_linear = self.inner._layer_macs[layer]
            total += 2.0 * n * (attn_linear + mlp_linear) + 4.0 * n**2 * attn_dim
        for stage, head in enumerate(model.aux_heads):
            total += 2.0 * graded[:, stage] * linear_macs(head)
        return total + 2.0 * final * linear_macs(model.head)

    def planned_flops(self, counts: Sequence[float]) -> float:
        """FLOPs per image when exactly ``counts[s]`` patch tokens exit at boundary ``s`` (fractions allowed).

        The same count as :meth:`early_exit_flops` of a forward that exited those counts, so a quota's cost is
        known before any image is seen (every image of a quota forward costs this).
        """
        if len(counts) != len(self.exit_after):
            raise ValueError(f"{len(counts)} exit counts for {len(self.exit_after)} exit stages ({self.exit_after})")
        exited = [sum(counts[: s + 1]) for s in range(len(counts))]  # exited by the end of stage s
        live, gone = [], 0.0  # live tokens entering each block; gone: exited before it
        for layer in range(self.depth):
            if layer in self.exit_after:  # a boundary after `layer` blocks
                gone = exited[self.exit_after.index(layer)]
            live.append(self.num_protected + self.num_patches - gone)
        graded = [self.num_patches - (exited[s - 1] if s else 0.0) for s in range(len(counts))]
        final = self.num_patches - exited[-1]
        as_row = partial(torch.tensor, dtype=torch.float64)
        return float(self._exit_flops(as_row([live]), as_row([graded]), as_row([final]))[0])

    def dense_flops(self) -> float:
        """FLOPs per image of the unreduced segmenter (what a FLOPs fraction is relative to)."""
        return float(super().analytic_flops(self.num_protected + self.num_patches, [0] * self.depth)["total"])

    def analytic_flops(self, num_tokens: int, schedule: list[int], method: Method | None = None) -> dict:
        runtime = self._runtime
        if not isinstance(method, EarlyExitMethod) or runtime is None or runtime.state is None:
            return super().analytic_flops(num_tokens, schedule, method)
        # Early exit: image 0 of the last forward (count_flops compares it with a batch of one).
        state = runtime.state
        rows = []
        for layer, (tokens_in, tokens_out) in enumerate(state.tokens_per_layer(0)):
            flops = self.layer_flops(layer, tokens_in, tokens_in)
            rows.append({"layer": layer, "tokens_in": tokens_in, "tokens_out": tokens_out, "flops": flops,
                         "method_flops": 0.0})  # fmt: skip
        embed = self.embed_flops(state.tokens_in[0, 0].item())
        total = float(self.early_exit_flops(state)[0])
        return {"embed": embed, "head": total - embed - sum(r["flops"] for r in rows), "total": total, "layers": rows}

    # ----------------------------------------------------------------- install / uninstall
    def resolve_schedule(self, runtime: Any) -> list[int] | None:
        if isinstance(runtime.method, EarlyExitMethod):
            # No per-layer schedule: an early-exit method's flops budget is its own (solved in check_model).
            return [0] * self.depth
        return super().resolve_schedule(runtime)

    def install(self, runtime: Any) -> None:
        self._runtime = runtime
        if isinstance(runtime.method, EarlyExitMethod):
            forward = partial(self._early_exit_forward, runtime)
        else:
            if not runtime.config.trace_source:
                # Unmerging to the full grid needs to know which original tokens each token holds.
                runtime.config = dataclasses.replace(runtime.config, trace_source=True)
            self.inner.install(runtime)
            self._inner_installed = True
            forward = partial(self._dense_forward, runtime)
        # An instance attribute shadows ViTSegmenter.forward; uninstall deletes it again.
        self.model.__dict__["forward"] = forward

    def uninstall(self) -> None:
        if self._inner_installed:
            self.inner.uninstall()
            self._inner_installed = False
        self.model.__dict__.pop("forward", None)
        self._runtime = None

    # ----------------------------------------------------------------- forwards
    def _original(self, images: torch.Tensor, return_aux: bool) -> Any:
        return type(self.model).forward(self.model, images, return_aux=return_aux)

    def _dense_forward(self, runtime: Any, images: torch.Tensor, return_aux: bool = False) -> torch.Tensor:
        if not runtime.enabled:
            return self._original(images, return_aux)
        if return_aux:
            raise ValueError("return_aux=True needs the unreduced model: call it inside tokenprune.disabled(model)")
        model, prefix = self.model, self.num_protected
        x = model.embed(images)  # (B, N, C)
        for block in model.backbone.blocks:  # the timm adapter's wrappers reduce inside
            x = block(x)
        features = model.backbone.norm(x)[:, prefix:]  # (B, N' - P, C)
        state = runtime.state
        if state is not None and state.reduced:
            features = unmerge_to_grid(features, state.source[:, prefix:, prefix:], self.grid)  # (B, M, C)
        return model.tokens_to_map(model.head(features))

    def _early_exit_forward(self, runtime: Any, images: torch.Tensor, return_aux: bool = False) -> torch.Tensor:
        if not runtime.enabled:
            return self._original(images, return_aux)
        if return_aux:
            raise ValueError("return_aux=True needs the unreduced model: call it inside tokenprune.disabled(model)")
        model, prefix, method = self.model, self.num_protected, runtime.method
        exits = self.exit_after
        x = model.embed(images)  # (B, P + M, C)
        batch, num_patches = x.shape[0], x.shape[1] - prefix
        device = x.device
        # Per original patch token: its final logits, which stage predicted it, how often it was predicted.
        final = x.new_zeros(batch, num_patches, model.num_classes)  # (B, M, K)
        exit_stage = torch.full((batch, num_patches), len(exits), dtype=torch.long, device=device)
        predictions = torch.zeros(batch, num_patches, dtype=torch.long, device=device)
        positions = torch.arange(num_patches, device=device).expand(batch, num_patches)  # (B, L) original ids
        valid = torch.ones(batch, num_patches, dtype=torch.bool, device=device)  # (B, L) real, not padding
        bias = None  # (B, 1, 1, P + L) additive key mask once rows are padded
        tokens_in = torch.zeros(batch, self.depth, dtype=torch.long, device=device)
        graded = torch.zeros(batch, len(exits), dtype=torch.long, device=device)
        log: list[LayerLog] = []
        for layer, block in enumerate(model.backbone.blocks):
            tokens_in[:, layer] = prefix + valid.sum(dim=1)
            length = x.shape[1]
            x = block(x, attn_mask=bias) if bias is not None else block(x)
            log.append(LayerLog(layer, length, length))
            if layer + 1 not in exits:
                continue
            stage = exits.index(layer + 1)
            logits = model.aux_heads[stage](x[:, prefix:])  # (B, L, K)
            graded[:, stage] = valid.sum(dim=1)
            # The method decides; "& valid" only guarantees padding never exits, whatever a method returns.
            leaving = valid & method.exits(ExitContext(stage, len(exits), layer + 1, logits, valid))  # (B, L)
            if not bool(leaving.any()):
                continue
            final = scatter_rows(final, positions, logits, leaving)
            exit_stage = _scatter_ids(exit_stage, positions, torch.full_like(positions, stage), leaving)
            predictions = predictions + _scatter_ids(torch.zeros_like(predictions), positions, leaving.long(), leaving)
            # Real removal: live tokens move to the front of each row (in order), the tail is padding.
            index, valid = compact(valid & ~leaving)  # (B, L'), (B, L')
            patches = x[:, prefix:].gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :prefix], patches], dim=1)
            positions = positions.gather(1, index)
            bias = key_padding_bias(valid, prefix, x.dtype)
            log[-1] = LayerLog(layer, length, x.shape[1])
        logits = model.final_logits(x[:, prefix:])  # (B, L, K)
        final = scatter_rows(final, positions, logits, valid)
        predictions = predictions + _scatter_ids(torch.zeros_like(predictions), positions, valid.long(), valid)
        runtime.state = EarlyExitState(
            exit_stage=exit_stage,
            predictions=predictions,
            tokens_in=tokens_in,
            graded=graded,
            final_tokens=valid.sum(dim=1),
            exit_after=exits,
            log=log,
        )
        return model.tokens_to_map(final)


def _scatter_ids(target: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, where: torch.Tensor):
    """:func:`scatter_rows` for ``(B, M)`` integer maps: ``target[b, positions[b, j]] = values[b, j]`` where set."""
    return scatter_rows(target.unsqueeze(-1), positions, values.unsqueeze(-1), where).squeeze(-1)


def unmerge_to_grid(features: torch.Tensor, source: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Every original patch token takes the feature of the reduced token that holds it.

    Args:
        features: ``(B, L, C)`` reduced patch tokens.
        source: ``(B, L, M)`` 0/1: which original patch tokens each reduced token holds (merged groups).
        grid: Patch grid ``(h, w)`` with ``h * w = M``, raster order.

    Returns:
        ``(B, M, C)``. Tokens held by nobody (pruned outright) take the feature of the nearest held token
        on the grid (ties: lowest position).
    """
    held = source.sum(dim=1) > 0  # (B, M)
    owner = source.argmax(dim=1)  # (B, M): index of the reduced token holding each original one
    if not bool(held.all()):
        rows, cols = torch.meshgrid(
            torch.arange(grid[0], device=source.device), torch.arange(grid[1], device=source.device), indexing="ij"
        )
        coords = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()  # (M, 2)
        distance = torch.cdist(coords, coords).expand(source.shape[0], -1, -1)  # (B, M, M)
        nearest = distance.masked_fill(~held.unsqueeze(1), torch.inf).argmin(dim=-1)  # (B, M) a held position
        owner = owner.gather(1, nearest)
    return features.gather(1, owner.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


register_adapter(_is_segmenter, SegmenterAdapter, SegmenterAdapter.description)

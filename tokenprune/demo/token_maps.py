"""Token maps: which original patches each remaining token holds, drawn over the model's crop of the image.

Both tabs draw with :func:`render_token_map` from a ``(gh, gw)`` array of token ids per patch (-1: dropped): the
classification tab reads it from a ViT's ``patch.state.source`` matrix (:func:`groups_from_source`), the VQA tab
from a VLM's ``patch.state.source`` / ``index_in`` at one LLM layer (:func:`groups_at_layer`);
:func:`describe_groups` words the legend of either.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image

CELL = 28  # display pixels per patch in the token maps
DROPPED_RGB = (40, 40, 40)
EDGE_RGB = (255, 255, 255)
GOLDEN = 0.618033988749895  # hue step between successive groups' tints: neighbours in the order differ most


# ---------------------------------------------------------------------------------------------- images


def model_crop(image: Image.Image, img_size: int) -> np.ndarray:
    """The pixels the model sees (shorter side resized to ``img_size``, centre crop), ``(S, S, 3)`` uint8."""
    from torchvision import transforms as T

    crop = T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size)])
    return np.asarray(crop(image).convert("RGB"))


# ------------------------------------------------------------------------------------------ token maps


def groups_from_source(source: torch.Tensor, num_protected: int, grid: tuple[int, int]) -> np.ndarray:
    """Which token holds each patch: ``(gh, gw)`` token ids, -1 for dropped patches.

    Args:
        source: ``(N, N0)`` 0/1 matrix of one image (``patch.state.source[0]``).
        num_protected: Prefix tokens before the patches in the original order.
        grid: ``(gh, gw)`` patch grid, ``gh * gw == N0 - num_protected``.
    """
    held = source[:, num_protected:] > 0  # (N, gh*gw)
    owner = held.float().argmax(dim=0)  # (gh*gw,)
    owner = torch.where(held.any(dim=0), owner, torch.full_like(owner, -1))
    return owner.reshape(grid).cpu().numpy()


def groups_at_layer(
    source: torch.Tensor, entering: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]
) -> np.ndarray:
    """Which token holds each patch at one LLM layer of a VLM: ``(gh, gw)`` token ids, -1 for dropped patches.

    A patch is still represented at the layer iff the token standing for it after merging before the LLM is
    among the tokens entering the layer; its token id is that token's input position (shared by a merged group).

    Args:
        source: ``(L,)`` of one sample (``patch.state.source[b]``): for every input position, the input position
            of the token standing for it, -1 if dropped before the LLM.
        entering: ``(N_l,)`` input positions of the tokens entering the layer (``patch.state.index_in[l][b]``;
            -1: fill).
        positions: ``(gh * gw,)`` input position of each patch's placeholder, in patch (row-major) order.
        grid: ``(gh, gw)`` patch grid.
    """
    owner = source[positions]  # (gh*gw,)
    alive = (owner >= 0) & torch.isin(owner, entering[entering >= 0])
    return torch.where(alive, owner, torch.full_like(owner, -1)).reshape(grid).cpu().numpy()


def describe_groups(groups: np.ndarray, fill: str = "average colour") -> str:
    """The token map's legend for ``groups`` (``(gh, gw)`` token ids, -1 dropped), as a sentence.

    Args:
        groups: ``(gh, gw)`` token id per patch, -1 where dropped.
        fill: How :func:`render_token_map` painted merged groups (words for the legend).
    """
    flat = groups.ravel()
    _, sizes = np.unique(flat[flat >= 0], return_counts=True)
    merged = sizes[sizes > 1]
    return (
        f"{merged.size} merged groups hold {int(merged.sum())} patches (outlined, {fill}); "
        f"{int((flat < 0).sum())} patches dropped (dark grey); the rest are tokens of their own."
    )


def group_tints(ids: np.ndarray) -> np.ndarray:
    """``(n, 3)`` float RGB in [0, 255], one distinct hue per group id of ``ids`` (in the order given)."""
    hues = (np.arange(len(ids)) * GOLDEN) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 0.95) for h in hues]).reshape(-1, 3) * 255


def render_token_map(crop: np.ndarray, groups: np.ndarray, cell: int = CELL, tint: float = 0.0) -> np.ndarray:
    """Paint each merged group in one colour (outlined), dropped patches dark grey.

    Args:
        crop: ``(S, S, 3)`` uint8 model input.
        groups: ``(gh, gw)`` token id per patch, -1 where dropped.
        cell: Output pixels per patch side.
        tint: A merged group's colour is its average colour mixed with a hue of its own by this weight in [0, 1]
            (0: the average colour alone; more tells groups apart on images of plain background, where the
            averages of different groups look alike).

    Returns:
        ``(gh * cell, gw * cell, 3)`` uint8 picture. Patches that are still a token of their own show
        the image itself.
    """
    if not 0.0 <= tint <= 1.0:
        raise ValueError(f"tint must be in [0, 1] (weight of a group's own hue), got {tint}")
    gh, gw = groups.shape
    ph, pw = crop.shape[0] // gh, crop.shape[1] // gw
    patch_rgb = crop[: gh * ph, : gw * pw].astype(np.float64).reshape(gh, ph, gw, pw, 3).mean(axis=(1, 3))
    flat = groups.ravel()
    kept = flat >= 0
    count = max(int(flat.max()) + 1, 1)
    sizes = np.bincount(flat[kept], minlength=count)
    sums = np.stack(
        [np.bincount(flat[kept], weights=patch_rgb.reshape(-1, 3)[kept, c], minlength=count) for c in range(3)], -1
    )
    means = sums / np.maximum(sizes, 1)[:, None]  # (count, 3)
    if tint:
        multi = np.flatnonzero(sizes > 1)  # merged groups, by id
        means[multi] = (1 - tint) * means[multi] + tint * group_tints(multi)
    means = means.round().astype(np.uint8)
    out = np.array(Image.fromarray(crop).resize((gw * cell, gh * cell), Image.Resampling.BICUBIC))
    up = np.repeat(np.repeat(groups, cell, axis=0), cell, axis=1)  # (H, W)
    merged = (up >= 0) & (sizes[np.maximum(up, 0)] > 1)
    out[merged] = means[up[merged]]
    out[up < 0] = DROPPED_RGB
    # Outline merged groups: boundaries between different groups where either side is a merged group.
    in_group = merged
    edge = np.zeros(up.shape, dtype=bool)
    horizontal = (up[:, :-1] != up[:, 1:]) & (in_group[:, :-1] | in_group[:, 1:])
    vertical = (up[:-1, :] != up[1:, :]) & (in_group[:-1, :] | in_group[1:, :])
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    edge[:-1, :] |= vertical
    edge[1:, :] |= vertical
    out[edge] = EDGE_RGB
    return out


def render_patch_grid(crop: np.ndarray, grid: tuple[int, int], cell: int = CELL) -> np.ndarray:
    """The model input at token-map scale with a faint patch grid."""
    gh, gw = grid
    out = np.array(Image.fromarray(crop).resize((gw * cell, gh * cell), Image.Resampling.BICUBIC)).astype(np.float32)
    lines = np.zeros(out.shape[:2], dtype=bool)
    lines[::cell, :] = True
    lines[:, ::cell] = True
    out[lines] = 0.7 * out[lines] + 0.3 * 255
    return out.round().astype(np.uint8)

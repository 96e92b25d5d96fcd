"""Token maps: which original patches each remaining token holds, drawn over the model's crop of the image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CELL = 28  # display pixels per patch in the token maps
DROPPED_RGB = (40, 40, 40)
EDGE_RGB = (255, 255, 255)


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


def render_token_map(crop: np.ndarray, groups: np.ndarray, cell: int = CELL) -> np.ndarray:
    """Paint merged groups in their average colour (outlined), dropped patches dark grey.

    Args:
        crop: ``(S, S, 3)`` uint8 model input.
        groups: ``(gh, gw)`` token id per patch, -1 where dropped.
        cell: Output pixels per patch side.

    Returns:
        ``(gh * cell, gw * cell, 3)`` uint8 picture. Patches that are still a token of their own show
        the image itself.
    """
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
    means = (sums / np.maximum(sizes, 1)[:, None]).round().astype(np.uint8)  # (count, 3)
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

"""What every tab of the demo shares: offline Gradio, reading a user's image, error messages in the page."""

from __future__ import annotations

import html
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from tokenprune.measure.accuracy import load_image

# Offline: no analytics or version check (set before gradio is imported; the caller's setting wins).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

MAX_MEGAPIXELS = 40.0
MAX_SIDE = 1024  # larger images are downscaled (long side) right after decoding
TIMING_ROUNDS = 3  # latency figures: median of this many interleaved original/reduced runs
# One queue for every event of every tab: they run one at a time in the order the page sent them.
QUEUE = {"concurrency_id": "tokenprune-demo", "concurrency_limit": 1}

# Folders the server may serve files from (example images); tabs add theirs through example_gallery.
ALLOWED_DIRS: set[str] = set()

__all__ = [
    "ALLOWED_DIRS",
    "MAX_MEGAPIXELS",
    "MAX_SIDE",
    "QUEUE",
    "TIMING_ROUNDS",
    "InputError",
    "error_html",
    "example_gallery",
    "gr",
    "interleaved_latency",
    "read_image",
]


class InputError(ValueError):
    """Something wrong with the user's input; its message is shown in the page as is."""


def read_image(path: str | os.PathLike[str] | None) -> Image.Image:
    """Open a user's file as an RGB image, long side at most ``MAX_SIDE``.

    Raises:
        InputError: No file, not an image, or more than ``MAX_MEGAPIXELS``; the message says which.
    """
    if path is None or str(path) == "":
        raise InputError("No image yet: pick one of the examples or upload a photo.")
    name = Path(path).name
    too_big = (
        f"{name} is too large: more than {MAX_MEGAPIXELS:.0f} megapixels. "
        "Please downscale it (e.g. to 4000 px on the long side) and try again."
    )
    unreadable = f"{name} is not an image this demo can read. Please upload a photo (JPEG, PNG, WebP, BMP or GIF)."
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:  # reads the header only
                width, height = probe.size
    except Image.DecompressionBombError:
        raise InputError(too_big) from None
    except (OSError, ValueError, SyntaxError):  # PIL raises these for non-images and broken headers
        raise InputError(unreadable) from None
    if width * height > MAX_MEGAPIXELS * 1e6:
        raise InputError(
            f"{name} is too large: {width}×{height} pixels = {width * height / 1e6:.1f} megapixels, "
            f"more than {MAX_MEGAPIXELS:.0f}. Please downscale it (e.g. to 4000 px on the long side) and try again."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(path)
    except ValueError:
        raise InputError(unreadable) from None
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return image


def error_html(message: str) -> str:
    return (
        '<div class="tp-error" role="alert" style="border:1px solid #d9534f;background:#fdecea;color:#8a1f11;'
        f'padding:10px 14px;border-radius:6px;font-weight:600">⚠ {html.escape(message)}</div>'
    )


def example_gallery(examples: list[tuple[str, str]], label: str, elem_id: str) -> gr.Gallery:
    """A one-row gallery of ``(image path, caption)`` examples to click; their folders become servable."""
    ALLOWED_DIRS.update(str(Path(path).resolve().parent) for path, _ in examples)
    return gr.Gallery(
        value=list(examples),
        label=label,
        columns=len(examples),
        rows=1,
        height=170,
        allow_preview=False,
        interactive=False,
        buttons=[],
        elem_id=elem_id,
    )


def interleaved_latency(
    model: Any, forward: Callable[[], Any], rounds: int = TIMING_ROUNDS
) -> tuple[float, float, Any]:
    """Median milliseconds of ``forward()`` as the original model and as the patched one, interleaved.

    ``model`` must be patched; each round runs ``forward()`` once inside ``tokenprune.disabled(model)`` (the
    original path) and once patched, so machine noise hits both alike.

    Returns:
        ``(ms_original, ms_reduced, output of the last original run)``.
    """
    import tokenprune

    original_s: list[float] = []
    reduced_s: list[float] = []
    output = None
    for _ in range(rounds):
        with tokenprune.disabled(model):
            start = time.perf_counter()
            output = forward()
            original_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        forward()
        reduced_s.append(time.perf_counter() - start)
    return 1000 * statistics.median(original_s), 1000 * statistics.median(reduced_s), output

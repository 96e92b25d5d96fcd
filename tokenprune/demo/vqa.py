"""The demo's VQA tab: a LLaVA model of the zoo answering with all visual tokens vs with fewer.

Models (:data:`VQA_MODELS`, those whose weights are installed): ``llava-easyvqa`` (144 visual tokens, easy-VQA)
and ``llava-scenes`` (576, LLaVA-1.5's count, on procedural scenes: counting, relations, small objects,
reading); the model dropdown swaps the examples, the token grid and the layer slider.

Methods: every vision-language method in the registry but the control (``tokenprune.methods(kind="vlm")``, read
when the tab is built), so methods that reduce before the LLM (merging or pruning each image's tokens), methods
that prune inside it and ViT methods run inside the vision tower appear alike. The budget slider sets the option
the registry says a method is budgeted by (:func:`budget_control`): ``flops=`` for every method whose config has a
``flops`` field (a fraction of the LLM prefill FLOPs; of the vision tower's for a ViT method, one that is not a
``VisualTokenMethod``); else the method's ``budget_parameter``; else its ``example`` options run. A budget the
method refuses for this prompt is shown as its own message in the page.

For one image and question: the answer of the original model and of the reduced one (greedy ``generate()``),
the LLM prefill GFLOPs and the vision (tower + projector) GFLOPs of each (the analytic table of
``tokenprune.count_flops``, which the flop counter confirms), prefill latency (interleaved runs) and a token map
of a chosen LLM layer: which original patches each visual token entering that layer stands for, from
``patch.state.source`` (the token standing for every input position after merging before the LLM) and
``patch.state.index_in`` (the tokens entering each layer). A merged group is painted in one colour of its own
(its average colour tinted with a hue of its own: easy-VQA's white backgrounds would make most averages alike)
and outlined, a token of its own shows the image, dropped patches (before or inside the LLM) are dark grey: the
drawing of the classification tab (:func:`tokenprune.demo.token_maps.render_token_map`).

Examples: for ``llava-easyvqa`` easy-VQA test images with their questions when the ``easy-vqa`` package is
installed (``pip install 'tokenprune[vqa]'``), else the bundled photos with a generic question; for
``llava-scenes`` test scenes (rendered from their seeds) with one question of each family.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

import tokenprune
from tokenprune import registry, zoo
from tokenprune.demo.common import (
    ALLOWED_DIRS,
    QUEUE,
    TIMING_ROUNDS,
    InputError,
    error_html,
    example_gallery,
    gr,
    interleaved_latency,
    read_image,
)
from tokenprune.demo.token_maps import describe_groups, groups_at_layer, render_token_map
from tokenprune.measure.accuracy import example_images
from tokenprune.methods.variants import is_control
from tokenprune.methods.vlm import VisualTokenMethod
from tokenprune.zoo import llava_common

logger = logging.getLogger(__name__)

#: The zoo's VQA models the tab offers, in the dropdown's order (those whose weights are installed).
VQA_MODELS = ("llava-easyvqa", "llava-scenes")
BUDGET_MIN, BUDGET_DEFAULT = 0.14, 0.25
MAX_QUESTION_CHARS = 200
MAX_NEW_TOKENS = 4
PIXELS_PER_PATCH = 24  # display size of one visual token in the token map
TAB_NAME = "VQA (visual tokens)"
# Merged groups: their average colour half mixed with a hue of their own (easy-VQA's plain white backgrounds
# would make most groups' averages alike), and named so in the legend.
TINT = 0.5
GROUP_FILL = "each its average colour tinted with a hue of its own"


def vqa_methods() -> tuple[str, ...]:
    """Every registered vision-language method but the control (the original model is the other column)."""
    return tuple(m for m in tokenprune.methods(kind="vlm") if not is_control(m))


@dataclass(frozen=True)
class BudgetControl:
    """What the budget slider sets for one method, read from the registry.

    Attributes:
        option: The config field the slider's value goes to; '' when none does (the method's ``example`` runs).
        label: The slider's label.
    """

    option: str
    label: str


def budget_control(method: str) -> BudgetControl:
    """``flops`` for a method whose config has that field, else its declared ``budget_parameter``, else none.

    ``flops`` is a fraction of the LLM prefill FLOPs for a vision-language method, of the vision tower's for a
    ViT method (one that runs inside the tower).
    """
    entry = registry.get_method(method)
    fields = entry.config_cls.field_names()
    if "flops" in fields:
        in_tower = not issubclass(entry.method_cls, VisualTokenMethod)
        return BudgetControl("flops", "Vision-tower FLOPs budget" if in_tower else "LLM prefill FLOPs budget")
    parameter = getattr(entry.method_cls, "budget_parameter", "")
    if parameter and parameter in fields:
        return BudgetControl(parameter, f"Budget: {method}'s {parameter}")
    return BudgetControl("", f"Budget (unused: {method} takes none; its example setting runs)")


def budget_options(method: str, budget: float) -> dict:
    """``tokenprune.apply`` options of ``method`` at the slider's ``budget`` (see :func:`budget_control`)."""
    control = budget_control(method)
    return {control.option: float(budget)} if control.option else registry.get_method(method).example


def method_note(method: str) -> str:
    """One line about ``method`` under the controls: its summary and what the budget sets."""
    control = budget_control(method)
    setting = f"the slider sets `{control.option}=`" if control.option else "no budget option"
    return f"**{method}**: {registry.get_method(method).summary} ({setting})"


@dataclass
class VQAResult:
    """Original vs reduced on one image + question."""

    answer_original: str
    answer_reduced: str
    llm_gflops_original: float
    llm_gflops_reduced: float
    vision_gflops_original: float  # vision tower + projector (+ any tower signals a method computes)
    vision_gflops_reduced: float
    ms_original: float
    ms_reduced: float
    groups: list[np.ndarray]  # per LLM layer, (grid, grid) token standing for each patch there (-1: dropped)
    visual_in: list[int]  # per LLM layer, visual tokens entering it
    photo: np.ndarray  # (S, S, 3) the image as the vision tower sees it (resized)
    grid: int
    options: dict  # what tokenprune.apply got


def layer_groups(state, positions: torch.Tensor, grid: int) -> list[np.ndarray]:
    """Per LLM layer, ``(grid, grid)`` token ids standing for each patch (-1: dropped), of sample 0.

    Args:
        state: ``patch.state`` after a prefill (a ``DecoderState``).
        positions: ``(grid * grid,)`` input positions of the image's placeholders, in patch order.
        grid: Patches per side.
    """
    source = state.source[0] if state.source is not None else torch.arange(state.num_original)
    return [groups_at_layer(source, index[0], positions, (grid, grid)) for index in state.index_in]


def _gflops(model, inputs: dict) -> tuple[float, float]:
    """``(LLM prefill, vision)`` GFLOPs of one prompt from the analytic table: the LLM's layers (LM head excluded),
    and what runs before them (vision tower and projector)."""
    report = tokenprune.count_flops(model, inputs)
    return sum(row["flops"] for row in report.layers) / 1e9, report.embed / 1e9


class VQADemo:
    """The VQA tab's computations (one forward at a time)."""

    def __init__(self, model, processor, module: ModuleType) -> None:
        """``module``: the model's zoo module (``prompt``, ``IMAGE_SIZE``, ``PATCH_SIZE``, ``MODEL_NAME``)."""
        self.model = model
        self.processor = processor
        self.module = module
        self.name = module.MODEL_NAME
        self.grid = module.IMAGE_SIZE // module.PATCH_SIZE
        self.depth = model.config.text_config.num_hidden_layers
        self._lock = threading.Lock()

    def encode(self, image: Image.Image, question: str) -> dict:
        return self.processor(images=image, text=self.module.prompt(question), return_tensors="pt")

    def _answer(self, inputs: dict) -> str:
        out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return llava_common.answer_of(self.processor, out[:, inputs["input_ids"].shape[1] :])[0] or "(empty)"

    @torch.no_grad()
    def compare(self, path: str, question: str, method: str, budget: float) -> VQAResult:
        """Answers, LLM GFLOPs, prefill latency and surviving visual tokens, original vs reduced.

        Raises:
            InputError: Bad image, or an empty / too long question.
            ValueError: A budget the method cannot reach (message from tokenprune, naming the valid range).
        """
        methods = vqa_methods()
        question = " ".join((question or "").split())
        if not question:
            raise InputError("Type a question about the image first (e.g. “what color is the shape?”).")
        if len(question) > MAX_QUESTION_CHARS:
            raise InputError(f"The question is too long: {len(question)} characters, at most {MAX_QUESTION_CHARS}.")
        if method not in methods:
            raise InputError(f"Unknown method {method!r}; choose one of {', '.join(methods)}.")
        image = read_image(path)
        inputs = self.encode(image, question)
        size = self.module.IMAGE_SIZE
        photo = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
        model = self.model
        with self._lock:
            answer_original = self._answer(inputs)
            llm_original, vision_original = _gflops(model, inputs)
            options = budget_options(method, budget)
            patch = tokenprune.apply(model, method, **options)
            try:
                prefill = {**inputs, "logits_to_keep": 1}
                model(**prefill)
                state = patch.state
                # Placeholder positions in order: the processor lays the image's patches out row by row.
                positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
                if positions.numel() != self.grid * self.grid:
                    raise RuntimeError(f"{positions.numel()} image placeholders, expected {self.grid**2}")
                groups = layer_groups(state, positions, self.grid)
                visual_in = [int(v[0]) for v in state.visual_in]
                llm_reduced, vision_reduced = _gflops(model, inputs)
                ms_original, ms_reduced, _ = interleaved_latency(model, lambda: model(**prefill))
                answer_reduced = self._answer(inputs)
            finally:
                patch.remove()
        return VQAResult(
            answer_original=answer_original,
            answer_reduced=answer_reduced,
            llm_gflops_original=llm_original,
            llm_gflops_reduced=llm_reduced,
            vision_gflops_original=vision_original,
            vision_gflops_reduced=vision_reduced,
            ms_original=ms_original,
            ms_reduced=ms_reduced,
            groups=groups,
            visual_in=visual_in,
            photo=photo,
            grid=self.grid,
            options=options,
        )


def zoo_module(name: str) -> ModuleType:
    """The zoo module of one of :data:`VQA_MODELS` (the module of its registered loader)."""
    if name not in VQA_MODELS:
        raise ValueError(f"unknown VQA model {name!r}; valid: {', '.join(VQA_MODELS)}")
    return importlib.import_module(zoo.get_entry(name).loader.split(":")[0])


def demo_examples(name: str = "llava-easyvqa") -> tuple[list[tuple[str, str]], str]:
    """``(image path, question)`` examples for the model ``name`` and where they come from."""
    if name == "llava-scenes":
        return scene_examples(), "test scenes"
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


def scene_examples(count: int = 6) -> list[tuple[str, str]]:
    """The first ``count`` test scenes as PNG files (rendered from their seeds into a temporary folder), each
    with a question of another family (count, existence, attribute, relation, position, reading, compare)."""
    from tokenprune.zoo import scenes

    folder = Path(tempfile.mkdtemp(prefix="tokenprune-scenes-"))
    examples = []
    for i, seed in enumerate(scenes.split_scenes("test", count)):
        scene = scenes.make_scene(seed)
        questions = scenes.questions_for(scene)
        path = folder / f"scene_{seed}.png"
        scene.image.save(path)
        examples.append((str(path), questions[i % len(questions)].question))
    return examples


def load_demos() -> dict[str, VQADemo]:
    """A :class:`VQADemo` per model of :data:`VQA_MODELS` whose weights load (a missing one is logged)."""
    demos = {}
    for name in VQA_MODELS:
        try:
            model, processor = tokenprune.load_model(name)
        except (FileNotFoundError, ValueError, RuntimeError, ImportError) as error:
            logger.warning("VQA tab: %s", error)
            continue
        demos[name] = VQADemo(model, processor, zoo_module(name))
    return demos


def model_description(demo: VQADemo) -> str:
    return (
        f"Model: **{demo.name}**: {zoo.get_entry(demo.name).description}; {demo.grid}×{demo.grid} = "
        f"{demo.grid**2} visual tokens per image."
    )


def vqa_tab() -> bool:
    """Adds the VQA tab to the enclosing ``gr.Tabs``; False (nothing added) if no VQA model is installed."""
    demos = load_demos()
    if not demos:
        return False
    names = list(demos)
    gallery_of = {name: demo_examples(name) for name in names}  # (examples, source) per model
    for examples, _ in gallery_of.values():  # the server may send every model's example images
        ALLOWED_DIRS.update(str(Path(path).resolve().parent) for path, _ in examples)
    cache: dict[str, VQAResult] = {}  # 'last': the result the layer slider redraws

    def blank(message: str) -> tuple:
        return (error_html(message), "", "", "", "", None, "")

    def map_outputs(result: VQAResult, layer: int) -> tuple:
        layer = max(0, min(int(layer), len(result.groups) - 1))
        groups = result.groups[layer]
        caption = (
            f"Visual tokens entering LLM layer {layer} (of {len(result.groups)}): **{result.visual_in[layer]}** "
            f"(from {result.grid * result.grid} patches). {describe_groups(groups, GROUP_FILL)} "
            "Visual tokens per layer: " + ", ".join(map(str, result.visual_in))
        )
        return render_token_map(result.photo, groups, cell=PIXELS_PER_PATCH, tint=TINT), caption

    def analyze(path: str | None, question: str, name: str, method: str, budget: float, layer: float) -> tuple:
        try:
            if path is None:
                raise InputError("No image yet: pick one of the examples or upload an image.")
            if name not in demos:
                raise InputError(f"Unknown model {name!r}; choose one of {', '.join(names)}.")
            result = demos[name].compare(path, question, method, float(budget))
        except InputError as error:
            return blank(str(error))
        except (ValueError, TypeError, NotImplementedError) as error:  # the method refuses this setting
            logger.info("VQA request refused: %s", error)
            option = budget_control(method).option if method in vqa_methods() else ""
            setting = f" with {option}={budget:.2f}" if option else ""
            return blank(f"{method}{setting}: {error}")
        except Exception as error:  # the page says so and the app keeps serving
            logger.exception("VQA request failed")
            return blank(f"Something went wrong ({type(error).__name__}: {error}). Try another image or setting.")
        cache.clear()
        cache["last"] = result
        original = (
            f"**{result.llm_gflops_original:.3f} LLM prefill GFLOPs** · {result.vision_gflops_original:.2f} vision "
            f"GFLOPs · **{result.ms_original:.0f} ms** prefill · {result.grid * result.grid} visual tokens in "
            "every layer"
        )
        ratio = result.llm_gflops_reduced / result.llm_gflops_original
        vision_ratio = result.vision_gflops_reduced / result.vision_gflops_original
        same = "same answer" if result.answer_reduced == result.answer_original else "answer differs"
        reduced = (
            f"**{result.llm_gflops_reduced:.3f} LLM prefill GFLOPs** ({100 * ratio:.0f}% of the original) · "
            f"{result.vision_gflops_reduced:.2f} vision GFLOPs ({100 * vision_ratio:.0f}%) · "
            f"**{result.ms_reduced:.0f} ms** prefill (speedup {result.ms_original / result.ms_reduced:.2f}×) · {same}"
            f" · `{method}({', '.join(f'{k}={v}' for k, v in result.options.items())})`"
        )
        picture, caption = map_outputs(result, layer)
        return ("", f"## {result.answer_original}", original, f"## {result.answer_reduced}", reduced, picture, caption)

    def on_example(name: str, method: str, budget: float, layer: float, evt: gr.SelectData) -> tuple:
        path, question = gallery_of[name][0][evt.index]
        return (path, question, None, *analyze(path, question, name, method, budget, layer))

    def on_upload(path: str | None, question: str, name: str, method: str, budget: float, layer: float) -> tuple:
        outputs = analyze(path, question, name, method, budget, layer)
        return (path, None if outputs[0] else gr.skip(), *outputs)

    def on_model(name: str) -> tuple:
        """Another model: its examples, description and layer range; the last answers no longer apply."""
        demo, (examples, source) = demos[name], gallery_of[name]
        cache.clear()
        return (
            model_description(demo),
            gr.Gallery(value=list(examples), label=f"Examples: {source}", columns=len(examples)),
            gr.Slider(0, demo.depth - 1, value=demo.depth // 2, step=1),
            None,
            *blank("")[1:],
        )

    def on_layer(layer: float) -> tuple:
        if "last" not in cache:
            return gr.skip(), gr.skip()
        return map_outputs(cache["last"], layer)

    def on_method(name: str) -> tuple:
        return gr.Slider(label=budget_control(name).label), method_note(name)

    methods = vqa_methods()
    demo = demos[names[0]]
    examples, source = gallery_of[names[0]]
    with gr.Tab(TAB_NAME, id="vqa"):
        gr.Markdown(
            "### Visual question answering: fewer visual tokens in the LLM\n"
            "Methods: every registered vision-language method; some reduce each image's tokens before the LLM, "
            "some prune inside it, and ViT methods run inside the vision tower. The budget is `flops=` for every "
            "method with that option: a fraction of the LLM prefill FLOPs (of the vision tower's for a method "
            "inside the tower)."
        )
        with gr.Row():
            model_name = gr.Dropdown(names, value=names[0], label="Model", elem_id="tp-vqa-model", scale=1)
            description = gr.Markdown(model_description(demo), elem_id="tp-vqa-model-note")
        current = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                gallery = example_gallery(examples, f"Examples: {source}", "tp-vqa-examples")
            with gr.Column(scale=2):
                upload = gr.File(label="…or upload an image", type="filepath", height=100, elem_id="tp-vqa-upload")
                question = gr.Textbox(label="Question", placeholder="what color is the shape?", elem_id="tp-vqa-q")
                with gr.Row():
                    method = gr.Dropdown(list(methods), value=methods[0], label="Method", elem_id="tp-vqa-method")
                    budget = gr.Slider(
                        BUDGET_MIN, 1.0, value=BUDGET_DEFAULT, step=0.01, label=budget_control(methods[0]).label,
                        elem_id="tp-vqa-budget",
                    )  # fmt: skip
                note = gr.Markdown(method_note(methods[0]), elem_id="tp-vqa-method-note")
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
                token_map = gr.Image(
                    label="Patches each surviving visual token stands for", interactive=False, elem_id="tp-vqa-map"
                )
            with gr.Column():
                layer = gr.Slider(0, demo.depth - 1, value=demo.depth // 2, step=1, label="LLM layer",
                                  elem_id="tp-vqa-layer")  # fmt: skip
                caption = gr.Markdown(elem_id="tp-vqa-caption")
                gr.Markdown(
                    "LLM prefill GFLOPs (2 × MAC): the language model's layers on this prompt, vision tower and LM "
                    "head excluded; vision GFLOPs: the tower and projector (and any tower signal a method reads)."
                    f" Latency: median of {TIMING_ROUNDS} CPU prefills, original and reduced "
                    "interleaved. Answers: greedy `generate()`."
                )
    outputs = [error, original_answer, original_stats, reduced_answer, reduced_stats, token_map, caption]
    settings = [model_name, method, budget, layer]
    gallery.select(on_example, settings, [current, question, upload, *outputs], **QUEUE)
    upload.upload(on_upload, [upload, question, *settings], [current, upload, *outputs], **QUEUE)
    run.click(analyze, [current, question, *settings], outputs, **QUEUE)
    question.submit(analyze, [current, question, *settings], outputs, **QUEUE)
    layer.change(on_layer, [layer], [token_map, caption], trigger_mode="always_last", **QUEUE)
    method.change(on_method, [method], [budget, note])  # labels only: no need to wait for a running request
    model_name.change(on_model, [model_name], [description, gallery, layer, current, *outputs[1:]], **QUEUE)
    return True

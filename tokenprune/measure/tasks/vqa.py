"""VQA: answer accuracy vs LLM prefill FLOPs of a vision-language model.

``--model llava-easyvqa`` scores the easy-VQA test split (from the easy-vqa package), ``--model llava-scenes``
the procedural scenes' test split (:data:`SCENE_TEST_IMAGES` scenes generated from their fixed seeds, one question
per family each; accuracy per family too), unless ``--data`` names a JSONL file of questions
(:func:`tokenprune.measure.layouts.load_vqa_jsonl`; ``--limit N``: its first N); any
other vision-language model (a local Hugging Face directory or a cached hub id) needs ``--data``. Prompts and
answers: :mod:`tokenprune.measure.answers` (the processor's chat template; ``accuracy`` is exact match,
``vqa_accuracy`` the VQA soft score).

    tokenprune eval  --model llava-easyvqa --method aim --flops 0.14 --limit 300
    tokenprune sweep --model llava-easyvqa --methods none,aim,aim_merge,aim_prune,fastv,random \\
        --flops 1,0.5,0.35,0.25,0.14 --limit 300 --out eval/results/easyvqa_sweep

* **Accuracy**: exact match of the greedy ``generate()`` answer (``max_new_tokens=2``: one word + ``</s>``,
  special tokens dropped) with easy-VQA's answer, on the test split (``--limit N``: a seeded random subset of N
  questions, the same for every setting). Prompts are batched by length, so no batch holds padding.
* **FLOPs** (2 x MAC, ``torch.utils.flop_counter``), means over the first :data:`FLOPS_PROMPTS` evaluated
  prompts, batch 1, one prefill forward with the LM head on the last row only: ``total`` (vision tower +
  projector + LLM + head), ``vision`` (tower + projector, measured alone), ``llm_prefill = total - vision``.
  ``--flops`` is a fraction of the unreduced ``llm_prefill`` (as AIM counts), solved per prompt by the method.
* **Image features**: the accuracy loop memoises the vision tower + projector output per image
  (:func:`cached_image_features`): no method touches them (those that read the tower's attention turn the
  cache off), so this only skips recomputing identical numbers.
* **Prefill time**: the same batch-1 prefill, unpatched and patched alternately on the same prompts (the patch
  applied and removed around its forward), medians; ``llm`` times the language model alone (inside
  ``model.model.language_model``, which includes AIM's merging), ``total`` the whole forward.

Methods: every method registered for vision-language models plus the named variants of
:mod:`tokenprune.methods.variants` (``random`` is ``random_visual`` here; ``aim_merge``/``aim_prune`` isolate
AIM's two stages).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from tokenprune import registry
from tokenprune.api import apply
from tokenprune.measure.answers import encode, generate_answers, score, with_prompts
from tokenprune.measure.bench import ModuleTimer
from tokenprune.measure.options import method_options, parse_set
from tokenprune.measure.tasks.base import Column, Loaded, PlotSpec, Setting, Task, budget_settings, method_order
from tokenprune.methods.variants import Variant, is_control, names, resolve
from tokenprune.methods.vlm import VisualTokenMethod

MODEL_NAME = "llava-easyvqa"
KIND = "vlm"
FLOPS_PROMPTS = 4
TIMING_PROMPTS = 8
SUBSET_SEED = 0
_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def load_questions(split: str = "test", limit: int | None = None) -> list[dict[str, Any]]:
    """easy-VQA questions as ``{"question", "answer", "image_id", "image"}``; ``limit``: seeded subset.

    Raises:
        ImportError: easy-vqa is not installed (``pip install 'tokenprune[vqa]'``).
    """
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("the easy-VQA data comes from the easy-vqa package: pip install 'tokenprune[vqa]'") from error
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    rows = [
        {"index": i, "question": q, "answer": a, "image_id": img, "image": paths[img]}
        for i, (q, a, img) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]
    if limit:
        order = list(range(len(rows)))
        random.Random(SUBSET_SEED).shuffle(order)
        rows = [rows[i] for i in sorted(order[:limit])]
    return rows


#: Scenes of the ``llava-scenes`` test split (seeds ``scenes.SPLIT_SEEDS["test"]`` onwards).
SCENE_TEST_IMAGES = 2000


def load_scene_questions(split: str = "test", limit: int | None = None, scenes: int = SCENE_TEST_IMAGES):
    """The questions of ``scenes`` procedural scenes of ``split`` (:mod:`tokenprune.zoo.scenes`), as rows with
    ``"family"`` and the rendered image (``"pil"``); ``limit``: a seeded subset of the questions."""
    from tokenprune.zoo.scenes import make_scene, questions_for, split_scenes

    rows = []
    for seed in split_scenes(split, scenes):
        for q in questions_for(make_scene(seed)):
            row = {"index": len(rows), "question": q.question, "answer": q.answer, "family": q.family}
            rows.append({**row, "image": f"scene:{seed}", "seed": seed})
    if limit:
        order = list(range(len(rows)))
        random.Random(SUBSET_SEED).shuffle(order)
        rows = [rows[i] for i in sorted(order[:limit])]
    images = {seed: make_scene(seed).image for seed in sorted({row["seed"] for row in rows})}
    return [{**row, "pil": [images[row["seed"]]]} for row in rows]


def searched_options(model, processor, rows, name: str, variant: Variant, budget: float) -> dict[str, Any]:
    """A variant's own budget solver: of its candidate options (``variant.search(depth)``), the first whose
    measured LLM prefill FLOPs on the reference prompts come closest to ``budget``.

    Raises:
        ValueError: Even the cheapest candidate stays above the budget (by more than 0.02).
    """
    depth = model.config.text_config.num_hidden_layers
    base = unreduced_flops(model, processor, rows)
    best, lowest = None, None
    for candidate in variant.search(depth):
        options = {**variant.options, **candidate}
        patch = apply(model, variant.method, **options)
        try:
            ratio = flops_of(model, processor, rows)["llm_prefill"] / base["llm_prefill"]
        finally:
            patch.remove()
        if best is None or abs(ratio - budget) < best[0]:
            best = (abs(ratio - budget), options, ratio)
        lowest = ratio if lowest is None else min(lowest, ratio)
    if best[2] > budget + 0.02:
        raise ValueError(
            f"flops budget {budget} is below what {name} ({variant.note}) reaches "
            f"on this model: lowest {lowest:.3f}; valid budgets are in [{lowest:.3f}, 1]"
        )
    return best[1]


def flops_of(model, processor, rows) -> dict[str, float]:
    """Mean measured FLOPs of batch-1 prefills of ``rows``: total, vision (tower + projector), llm_prefill.

    The vision part is measured once: every image is resized to the same input size, so its FLOPs do not
    depend on the prompt (and no method here touches the tower).
    """
    from tokenprune.measure.flops import measure_flops

    totals, vision = [], None
    for row in rows:
        inputs = encode(processor, [row])
        totals.append(measure_flops(model, **inputs, logits_to_keep=1))
        if vision is None:
            visual = {k: v for k, v in inputs.items() if k not in _TEXT_INPUTS}
            vision = measure_flops(lambda kw: model.model.get_image_features(**kw), visual)
    total = statistics.fmean(totals)
    head = 2.0 * model.lm_head.in_features * model.lm_head.out_features  # one row
    return {"total": total, "vision": vision, "llm_prefill": total - vision - head, "head": head}


#: model -> prompts -> unreduced FLOPs; weak keys: a freed model's entry goes with it (an ``id()`` key could be
#: reused by the next model).
_UNREDUCED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unreduced_flops(model, processor, rows) -> dict[str, float]:
    """:func:`flops_of` the unpatched model, memoised per model and prompts (it is the same in every setting)."""
    mine = _UNREDUCED.setdefault(model, {})
    key = tuple((row["index"], row.get("prompt"), row["image"]) for row in rows)
    if key not in mine:
        mine[key] = flops_of(model, processor, rows)
    return mine[key]


def time_prefill(model, processor, rows, method: str, options: dict[str, Any], rounds: int = 2) -> dict[str, float]:
    """Median batch-1 prefill seconds (whole forward and LLM alone), unpatched vs patched, interleaved."""
    # Registered before any patch, so AIM's merging (the patch's own pre-hook on the LLM) is timed as LLM work.
    timer = ModuleTimer(model.model.language_model)
    times: dict[str, list[float]] = {"total_unpatched": [], "total_patched": [], "llm_unpatched": [], "llm_patched": []}
    encoded = [encode(processor, [row]) for row in rows]
    try:
        with torch.inference_mode():
            model(**encoded[0], logits_to_keep=1)  # warm-up
            for _ in range(rounds):
                for inputs in encoded:
                    for kind in ("unpatched", "patched"):
                        patch = apply(model, method, **options) if kind == "patched" else None
                        start = time.perf_counter()
                        model(**inputs, logits_to_keep=1)
                        times[f"total_{kind}"].append(time.perf_counter() - start)
                        times[f"llm_{kind}"].append(timer.seconds)
                        if patch is not None:
                            patch.remove()
    finally:
        timer.remove()
    medians = {f"prefill_ms_{k}": 1000 * statistics.median(v) for k, v in times.items()}
    medians["prefill_speedup_total"] = medians["prefill_ms_total_unpatched"] / medians["prefill_ms_total_patched"]
    medians["prefill_speedup_llm"] = medians["prefill_ms_llm_unpatched"] / medians["prefill_ms_llm_patched"]
    return medians


@contextmanager
def cached_image_features(model, cache: dict[str, torch.Tensor] | None):
    """Memoise ``LlavaModel.get_image_features`` (vision tower + projector) per image while inside.

    No method here touches the tower or the projector, so their output for an image is the same in every
    setting; the sweep computes it once per image instead of once per question and setting. Keys are the
    sha1 of each image's ``pixel_values``; values the (144, H) projected features. ``cache=None``: no-op.
    """
    if cache is None:
        yield
        return
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = model.model
    original = inner.get_image_features

    def cached(pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        keys = [hashlib.sha1(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for p in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            out = original(pixel_values=pixel_values[missing], **kwargs)
            for i, features in zip(missing, out.pooler_output, strict=True):
                cache[keys[i]] = features
        return BaseModelOutputWithPooling(pooler_output=[cache[key] for key in keys])

    inner.get_image_features = cached
    try:
        yield
    finally:
        del inner.get_image_features  # back to the class's method


def answer_accuracy(
    model,
    processor,
    rows,
    batch_size: int = 32,
    progress: bool = True,
    feature_cache: dict | None = None,
    max_new_tokens: int = 2,
) -> dict[str, Any]:
    """Exact-match (and VQA soft) accuracy of greedy ``generate()`` answers (:mod:`tokenprune.measure.answers`).

    ``feature_cache``: see :func:`cached_image_features` (None: the vision tower runs for every question).
    """
    context = cached_image_features(model, feature_cache)
    answers = generate_answers(model, processor, rows, batch_size, max_new_tokens, progress=progress, context=context)
    return score(rows, answers)


def evaluate_setting(
    model,
    processor,
    rows,
    name: str,
    options: dict[str, Any],
    batch_size: int = 32,
    timing_rounds: int = 2,
    feature_cache: dict | None = None,
    max_new_tokens: int = 2,
) -> dict[str, Any]:
    """Accuracy, FLOPs and prefill time of one method setting; the model is unpatched again afterwards.

    FLOPs and prefill times always run the whole model (vision tower included); ``feature_cache`` only
    serves the accuracy loop (see :func:`cached_image_features`; LLaVA only).
    """
    method, variant = resolve(name, KIND)
    options = {**variant.options, **options}
    method_cls = registry.get_method(method).method_cls
    if not issubclass(method_cls, VisualTokenMethod) or method_cls.tower_layer is not None:
        feature_cache = None  # the method reads the vision tower's attention or runs inside it: the tower must run
    if type(model).__name__ != "LlavaForConditionalGeneration":
        feature_cache = None  # the memo reproduces LLaVA's get_image_features output only
    reference = rows[:FLOPS_PROMPTS]
    base = unreduced_flops(model, processor, reference)
    if variant.search is not None and options.get("flops") is not None:
        budget = options.pop("flops")
        options = {**options, **searched_options(model, processor, reference[:1], name, variant, budget)}
    patch = apply(model, method, **options)
    try:
        reduced = flops_of(model, processor, reference)
        with torch.inference_mode():
            model(**encode(processor, rows[:1]), logits_to_keep=1)
        state = patch.state  # None when nothing is reduced (method none)
        layers = state.tokens_per_layer() if state is not None else []
        result: dict[str, Any] = {
            "method": name,
            "registered_method": method,
            "config": patch.config.to_dict(),
            "llm_flops_ratio": reduced["llm_prefill"] / base["llm_prefill"],
            "total_flops_ratio": reduced["total"] / base["total"],
            "gflops_llm_prefill": reduced["llm_prefill"] / 1e9,
            "gflops_llm_prefill_unreduced": base["llm_prefill"] / 1e9,
            "gflops_total": reduced["total"] / 1e9,
            "gflops_total_unreduced": base["total"] / 1e9,
            "gflops_vision": reduced["vision"] / 1e9,
            "flops_prompts": len(reference),
            "tokens_per_layer_first_prompt": [list(t) for t in layers],
        }
        result.update(answer_accuracy(model, processor, rows, batch_size, True, feature_cache, max_new_tokens))
        result["image_features_cached"] = feature_cache is not None
    finally:
        patch.remove()
    if timing_rounds > 0:
        result.update(time_prefill(model, processor, rows[:TIMING_PROMPTS], method, options, timing_rounds))
        result["timing_prompts"] = min(TIMING_PROMPTS, len(rows))
    result["threads"] = torch.get_num_threads()
    return result


def token_options(model, visual: int, texts: list[int], name: str, tokens: int) -> dict[str, Any]:
    """Options that leave ``tokens`` of an image's ``visual`` tokens to the LLM, or the LLM prefill FLOPs of that.

    Methods with a ``tokens`` option (those acting before the LLM) keep exactly ``tokens`` per image; ``tome``
    in the vision tower merges the same number in every tower layer before the (latest) feature layer the
    projector reads (the first layers take the remainder); methods that prune inside the LLM get the FLOPs
    budget of ``tokens`` visual tokens in every layer (the mean over prompts of ``texts`` text tokens), which
    they spend their own way.
    """
    method, _ = resolve(name, KIND)
    entry = registry.get_method(method)
    if "tokens" in entry.config_cls.field_names():
        return {"tokens": tokens}
    if tokens >= visual:
        raise ValueError(f"{tokens} tokens keep every one of the {visual} visual tokens per image")
    if not issubclass(entry.method_cls, VisualTokenMethod):  # a ViT method: it runs inside the vision tower
        from tokenprune.adapters.vlm.tower_merge import feature_layers

        depth = model.config.vision_config.num_hidden_layers
        before = feature_layers(model.config.vision_feature_layer, depth)[-1]  # layers whose merges reach the LLM
        base, extra = divmod(visual - tokens, before)
        return {"r": [base + (layer < extra) for layer in range(before)] + [0] * (depth - before)}
    flops = registry.find_adapter(model)(model).llm_flops  # the family's own per-layer LLM table
    depth = flops.depth
    ratios = [flops.prefill(text, [tokens] * depth, 0) / flops.prefill(text, [visual] * depth, 0) for text in texts]
    return {"flops": round(statistics.fmean(ratios), 4)}


def token_settings(loaded: Loaded, chosen: list[str], counts: list[int], fixed: dict[str, Any]) -> Iterator[Setting]:
    """(method, visual tokens per image) settings, count-major: the control once, every other at each count."""
    processor, model = loaded.extra["processor"], loaded.model
    lengths = [encode(processor, [row])["input_ids"] for row in loaded.data[:FLOPS_PROMPTS]]  # the reference prompts
    visual = int((lengths[0] == model.config.image_token_id).sum())
    texts = [int(ids.shape[1]) - visual for ids in lengths]
    for name in chosen:
        if is_control(name):
            yield Setting(name, dict(fixed), f"{name}_all.json", {"budget": 1.0, "tokens": None})
    for tokens in counts:
        for name in chosen:
            if not is_control(name):
                options = {**fixed, **token_options(model, visual, texts, name, tokens)}
                fields = {"budget": options.get("flops", 1.0), "tokens": tokens}
                yield Setting(name, options, f"{name}_t{tokens}.json", fields)


def _timing(row: dict[str, Any], part: str) -> str:
    if "prefill_ms_llm_patched" not in row:
        return ""
    return f"{row[f'prefill_ms_{part}_unpatched']:.1f} / {row[f'prefill_ms_{part}_patched']:.1f}"


def _budget(row: dict[str, Any]) -> str:
    tokens = row.get("tokens")
    if tokens is None:
        return f"{row['budget']}" if "tokens" not in row else "all tokens"
    return f"{tokens} tokens" + (f" (flops={row['budget']})" if row["budget"] < 1.0 else "")


class VQA(Task):
    """Exact-match answer accuracy, LLM prefill FLOPs and prefill time of ``llava-easyvqa`` on easy-VQA."""

    takes_tokens = True

    columns = [
        Column("method", lambda r: r["method"], lambda r: r["method"]),
        Column("budget (LLM prefill, or tokens per image)", _budget, _budget),
        Column("LLM FLOPs ratio (measured)", lambda r: f"{r['llm_flops_ratio']:.3f}", lambda r: "n/a"),
        Column("GFLOPs LLM prefill", lambda r: f"{r['gflops_llm_prefill']:.4f}"),
        Column("GFLOPs total", lambda r: f"{r['gflops_total']:.3f}"),
        Column("total ratio", lambda r: f"{r['total_flops_ratio']:.3f}"),
        Column("accuracy %", lambda r: f"{100 * r['accuracy']:.2f}", lambda r: r["error"]),
        Column("questions", lambda r: f"{r['questions']}"),
        Column("prefill ms unpatched / patched (LLM)", lambda r: _timing(r, "llm")),
        Column("prefill ms unpatched / patched (total)", lambda r: _timing(r, "total")),
    ]
    plot = PlotSpec(
        x="llm_flops_ratio", y="accuracy", xlabel="LLM prefill FLOPs / unreduced (measured, 2 x MAC)",
        ylabel="exact-match accuracy (%)", size=(6.8, 4.6), title_size=8,
    )  # fmt: skip

    def load(self, args: argparse.Namespace) -> Loaded:
        from tokenprune.measure.layouts import load_vqa_jsonl
        from tokenprune.measure.models import load_vlm, parse_model

        spec = parse_model(args.model, getattr(args, "allow_download", False))
        if getattr(args, "img_size", None):
            raise SystemExit(f"{args.model} runs at its processor's input size; --img-size is not accepted")
        data = getattr(args, "data", None)  # not $TOKENPRUNE_DATA: that holds the image datasets
        if data is None and spec.source != "zoo":
            raise SystemExit(f"{args.model} is scored on your questions: pass --data questions.jsonl")
        loaded = load_vlm(spec, getattr(args, "checkpoint", None), getattr(args, "dtype", None))
        style = loaded.extra["prompt"]
        max_new = getattr(args, "max_new_tokens", None) or loaded.extra["max_new_tokens"]
        if data is None:  # the zoo model's own test split
            scenes = loaded.extra["dataset"] == "scenes"
            rows = load_scene_questions("test", args.limit) if scenes else load_questions("test", args.limit)
            subset = f"seeded subset of {len(rows)} (seed {SUBSET_SEED})" if args.limit else f"all {len(rows)}"
            what = f"scenes test questions ({SCENE_TEST_IMAGES} scenes)" if scenes else "easy-VQA test questions"
            description = f"{what}: {subset}"
        else:
            rows = load_vqa_jsonl(data, args.limit)
            description = f"{data} ({len(rows)} questions{', first ' + str(args.limit) if args.limit else ''})"
        rows = with_prompts(loaded.processor, rows, style)
        # Image features, shared by every setting (see cached_image_features).
        extra = {"processor": loaded.processor, "features": {}, "max_new_tokens": max_new, "prompt": style}
        return Loaded(loaded.model, rows, description, extra)

    def eval_setting(self, args: argparse.Namespace) -> Setting:
        options = method_options(args)
        method, variant = resolve(args.method, KIND)
        # A plain alias (``random`` -> ``random_visual``) is filed under the method it runs.
        return Setting(method if not variant.options else args.method, options, fields={"budget": args.flops})

    def settings(self, loaded: Loaded, args: argparse.Namespace, done: Mapping[str, dict]) -> Iterator[Setting]:
        chosen = args.methods.split(",") if args.methods else names(KIND)
        args.methods = ",".join(chosen)
        for name in chosen:
            resolve(name, KIND)  # unknown names fail before the first setting runs
        fixed = parse_set(args.set or [])
        if getattr(args, "tokens", None):
            yield from token_settings(loaded, chosen, [int(n) for n in args.tokens.split(",")], fixed)
            return

        def options(name: str, budget: float) -> dict[str, Any]:
            return {**fixed, **({} if is_control(name) else {"flops": budget})}

        yield from budget_settings(chosen, [float(b) for b in args.flops.split(",")], options)

    def evaluate(self, loaded: Loaded, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
        return evaluate_setting(
            loaded.model, loaded.extra["processor"], loaded.data, setting.method, setting.options, args.batch_size,
            args.bench_rounds, loaded.extra["features"], loaded.extra.get("max_new_tokens", 2),
        )  # fmt: skip

    def order(self, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
        if not getattr(args, "tokens", None):
            return super().order(rows, args)
        names_ = method_order(rows, args)  # most tokens first; the control keeps them all
        return sorted(rows, key=lambda r: (names_.index(r["method"]), -(r.get("tokens") or float("inf"))))

    def title(self, args: argparse.Namespace, loaded: Loaded) -> str:
        return f"{args.model}: answer accuracy vs LLM prefill FLOPs ({loaded.description})"


TASK = VQA()

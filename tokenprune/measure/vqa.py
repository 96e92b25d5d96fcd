"""``tokenprune eval`` / ``sweep`` for the VQA model ``llava-easyvqa``: answer accuracy vs LLM prefill FLOPs.

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
  (:func:`cached_image_features`): no method touches them, so this only skips recomputing identical numbers.
* **Prefill time**: the same batch-1 prefill, unpatched and patched alternately on the same prompts (the patch
  applied and removed around its forward), medians; ``llm`` times the language model alone (inside
  ``model.model.language_model``, which includes AIM's merging), ``total`` the whole forward.

Methods: any vision-language method name (``aim``, ``fastv``, ``random_visual``) plus the variants in
:data:`VARIANTS` (``random`` is ``random_visual`` here; ``aim_merge``/``aim_prune`` isolate AIM's two stages).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tokenprune.api import apply
from tokenprune.measure.bench import ModuleTimer

MODEL_NAME = "llava-easyvqa"
FLOPS_PROMPTS = 4
TIMING_PROMPTS = 8
SUBSET_SEED = 0
# Sweep/eval method names -> (registered method, fixed options). ``aim_prune`` solves its schedule itself.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "aim": ("aim", {}),
    "aim_merge": ("aim", {"prune_start": 1.0, "prune_end": 1.0}),  # merging before the LLM only
    "aim_prune": ("aim", {"merge_keep": 1.0}),  # in-LLM pruning only; prune_start/end picked for the budget
    # AIM with its pruning moved to the last quarter of the layers (8 layers: half the visual tokens leave
    # before layer 7), the FLOPs budget met by merging: for shallow LLMs whose late layers still read the image.
    "aim_late": ("aim", {"prune_start": 0.75, "prune_end": 1.0}),
    "fastv": ("fastv", {}),  # FastV's K = 2
    "fastv_k1": ("fastv", {"k": 1}),  # prunes after layer 0: reaches lower budgets than K = 2
    "random": ("random_visual", {}),  # FastV's schedule (K = 2), random visual tokens
    "random_k1": ("random_visual", {"k": 1}),
    "random_visual": ("random_visual", {}),
}


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


def encode(processor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Processor inputs (``input_ids``, ``attention_mask``, ``pixel_values``) for a batch of questions."""
    from PIL import Image

    from tokenprune.llava_easyvqa import prompt

    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    return processor(images=images, text=[prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)


def resolve_method(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(registered method, options)`` of a sweep/eval method name (variants fill their fixed options)."""
    method, fixed = VARIANTS.get(name, (name, {}))
    return method, {**fixed, **options}


def prune_only_options(model, processor, rows, budget: float) -> dict[str, Any]:
    """AIM without merging: the ``prune_start``/``prune_end`` (multiples of 1/depth) whose measured LLM prefill
    FLOPs on the reference prompts come closest to ``budget`` (ties: the later, milder schedule)."""
    depth = model.config.text_config.num_hidden_layers
    base = unreduced_flops(model, processor, rows)
    best, lowest = None, None
    for start in range(1, depth + 1):  # layer 0 always sees every visual token (its attention scores the first cut)
        for end in range(start, depth + 1):
            options = {"merge_keep": 1.0, "prune_start": start / depth, "prune_end": end / depth}
            patch = apply(model, "aim", **options)
            try:
                ratio = flops_of(model, processor, rows)["llm_prefill"] / base["llm_prefill"]
            finally:
                patch.remove()
            key = (abs(ratio - budget), -start, -end)
            if best is None or key < best[0]:
                best = (key, options, ratio)
            lowest = ratio if lowest is None else min(lowest, ratio)
    if best[2] > budget + 0.02:
        raise ValueError(
            f"flops budget {budget} is below what aim_prune (pruning only, layer 0 sees every visual token) reaches "
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
            pixels = inputs["pixel_values"]
            vision = measure_flops(lambda p: model.model.get_image_features(pixel_values=p), pixels)
    total = statistics.fmean(totals)
    head = 2.0 * model.lm_head.in_features * model.lm_head.out_features  # one row
    return {"total": total, "vision": vision, "llm_prefill": total - vision - head, "head": head}


_UNREDUCED: dict[tuple[int, tuple[int, ...]], dict[str, float]] = {}


def unreduced_flops(model, processor, rows) -> dict[str, float]:
    """:func:`flops_of` the unpatched model, memoised per model and prompts (it is the same in every setting)."""
    key = (id(model), tuple(row["index"] for row in rows))
    if key not in _UNREDUCED:
        _UNREDUCED[key] = flops_of(model, processor, rows)
    return _UNREDUCED[key]


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
    model, processor, rows, batch_size: int = 32, progress: bool = True, feature_cache: dict | None = None
) -> dict[str, Any]:
    """Exact-match accuracy of greedy ``generate()`` answers (batches of equal prompt length: no padding).

    ``feature_cache``: see :func:`cached_image_features` (None: the vision tower runs for every question).
    """
    from tqdm.auto import tqdm

    from tokenprune.llava_easyvqa import answer_of, prompt

    tokenizer = processor.tokenizer
    by_length: dict[int, list[dict]] = {}
    for row in rows:
        by_length.setdefault(len(tokenizer(prompt(row["question"]))["input_ids"]), []).append(row)
    batches = [g[i : i + batch_size] for g in by_length.values() for i in range(0, len(g), batch_size)]
    correct, per_answer = 0, {}
    bar = tqdm(total=len(rows), desc="generate", unit="q", disable=not progress)
    with torch.inference_mode(), cached_image_features(model, feature_cache), bar:
        for batch in batches:
            inputs = encode(processor, batch)
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            for row, answer in zip(batch, answer_of(processor, out[:, inputs["input_ids"].shape[1] :]), strict=True):
                hit = answer == row["answer"]
                correct += hit
                stats = per_answer.setdefault(row["answer"], [0, 0])
                stats[0] += hit
                stats[1] += 1
            bar.update(len(batch))
    return {
        "accuracy": correct / max(1, len(rows)),
        "correct": correct,
        "questions": len(rows),
        "accuracy_per_answer": {a: c / n for a, (c, n) in sorted(per_answer.items())},
    }


def evaluate_setting(
    model,
    processor,
    rows,
    name: str,
    options: dict[str, Any],
    batch_size: int = 32,
    timing_rounds: int = 2,
    feature_cache: dict | None = None,
) -> dict[str, Any]:
    """Accuracy, FLOPs and prefill time of one method setting; the model is unpatched again afterwards.

    FLOPs and prefill times always run the whole model (vision tower included); ``feature_cache`` only
    serves the accuracy loop (see :func:`cached_image_features`).
    """
    method, options = resolve_method(name, options)
    reference = rows[:FLOPS_PROMPTS]
    base = unreduced_flops(model, processor, reference)
    if name == "aim_prune" and options.get("flops") is not None:
        budget = options.pop("flops")
        options = {**options, **prune_only_options(model, processor, reference[:1], budget)}
    patch = apply(model, method, **options)
    try:
        reduced = flops_of(model, processor, reference)
        with torch.inference_mode():
            model(**encode(processor, rows[:1]), logits_to_keep=1)
        state = patch.state  # None when nothing is reduced (method none)
        layers = state.tokens_per_layer() if state is not None and hasattr(state, "tokens_per_layer") else []
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
        result.update(answer_accuracy(model, processor, rows, batch_size, feature_cache=feature_cache))
        result["image_features_cached"] = feature_cache is not None
    finally:
        patch.remove()
    if timing_rounds > 0:
        result.update(time_prefill(model, processor, rows[:TIMING_PROMPTS], method, options, timing_rounds))
        result["timing_prompts"] = min(TIMING_PROMPTS, len(rows))
    result["threads"] = torch.get_num_threads()
    return result


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from tokenprune.cli import parse_set

    return parse_set(args.set or [])


def _load(args: argparse.Namespace):
    from tokenprune.zoo import load_model

    if getattr(args, "img_size", None):
        raise SystemExit(f"{MODEL_NAME} runs at its trained input size; --img-size is not accepted")
    if getattr(args, "data", None):
        raise SystemExit(f"{MODEL_NAME} evaluates on the easy-VQA test split from the easy-vqa package; drop --data")
    model, processor = load_model(MODEL_NAME, checkpoint=getattr(args, "checkpoint", None))
    rows = load_questions("test", args.limit)
    return model, processor, rows


def _data_label(args: argparse.Namespace, rows: list) -> str:
    subset = f"seeded subset of {len(rows)} (seed {SUBSET_SEED})" if args.limit else f"all {len(rows)}"
    return f"easy-VQA test questions: {subset}"


def cli_eval(args: argparse.Namespace) -> None:
    """``tokenprune eval --model llava-easyvqa``: one setting, JSON to stdout (and ``--out``)."""
    from tokenprune.cli import model_label

    model, processor, rows = _load(args)
    options = _options(args)
    if args.flops is not None:
        options["flops"] = args.flops
    if args.method == "random":
        args.method = "random_visual"
    result = evaluate_setting(
        model, processor, rows, args.method, options, args.batch_size, args.bench_rounds, feature_cache={}
    )
    result.update(
        {"model": model_label(args), "budget": args.flops, "data": _data_label(args, rows), "limit": args.limit}
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")


def cli_sweep(args: argparse.Namespace) -> None:
    """``tokenprune sweep --model llava-easyvqa``: methods x LLM-prefill budgets -> JSON, table, Pareto PNG."""
    from tqdm.auto import tqdm

    from tokenprune.cli import model_label
    from tokenprune.measure.sweep import sweep_settings

    model, processor, rows = _load(args)
    out_dir = Path(args.out)
    names = args.methods.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in ("aim", "fastv")]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown} for {MODEL_NAME}; valid: {sorted(VARIANTS)}")
    settings = sweep_settings(names, [float(b) for b in args.flops.split(",")])
    done: dict[tuple[str, float], dict] = {}
    data = _data_label(args, rows)
    feature_cache: dict[str, torch.Tensor] = {}  # image features, shared by every setting
    for name, budget in tqdm(settings, desc="sweep"):
        path = out_dir / f"{name}_{budget}.json"
        if args.resume and path.exists():
            done[name, budget] = json.loads(path.read_text())
            continue
        options = {**_options(args), **({"flops": budget} if name != "none" else {})}
        try:
            row = evaluate_setting(
                model, processor, rows, name, options, args.batch_size, args.bench_rounds, feature_cache
            )
        except ValueError as error:  # a budget this method cannot reach: recorded, not fatal
            row = {"method": name, "error": str(error)}
        row.update({"budget": budget, "model": model_label(args), "data": data, "limit": args.limit})
        done[name, budget] = row
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2) + "\n")
        ordered = [done[k] for k in sorted(done, key=lambda k: (names.index(k[0]), -k[1]))]
        write_outputs(ordered, out_dir, f"{MODEL_NAME}: answer accuracy vs LLM prefill FLOPs ({data})")
    ordered = [done[k] for k in sorted(done, key=lambda k: (names.index(k[0]), -k[1]))]
    write_outputs(ordered, out_dir, f"{MODEL_NAME}: answer accuracy vs LLM prefill FLOPs ({data})")
    sys.stdout.write((out_dir / "table.md").read_text())


def write_outputs(rows: list[dict], out_dir: Path, title: str) -> None:
    """``sweep.json``, ``table.md`` and ``pareto.png`` (accuracy vs measured LLM prefill FLOPs ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| method | budget (LLM prefill) | LLM FLOPs ratio (measured) | GFLOPs LLM prefill | GFLOPs total "
        "| total ratio | accuracy % | questions | prefill ms unpatched / patched (LLM) "
        "| prefill ms unpatched / patched (total) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['budget']} | n/a | | | | {row['error']} | | | |")
            continue
        timing = ("", "")
        if "prefill_ms_llm_patched" in row:
            timing = (
                f"{row['prefill_ms_llm_unpatched']:.1f} / {row['prefill_ms_llm_patched']:.1f}",
                f"{row['prefill_ms_total_unpatched']:.1f} / {row['prefill_ms_total_patched']:.1f}",
            )
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['llm_flops_ratio']:.3f} | {row['gflops_llm_prefill']:.4f} "
            f"| {row['gflops_total']:.3f} | {row['total_flops_ratio']:.3f} | {100 * row['accuracy']:.2f} "
            f"| {row['questions']} | {timing[0]} | {timing[1]} |"
        )
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6.8, 4.6))
    ok = [row for row in rows if "error" not in row]
    reference = [row for row in ok if row["method"] == "none"]
    for method in dict.fromkeys(row["method"] for row in ok):
        if method == "none":
            axis.scatter(
                [r["llm_flops_ratio"] for r in reference],
                [100 * r["accuracy"] for r in reference],
                marker="*",
                s=160,
                color="black",
                label="none (unreduced)",
                zorder=3,
            )
            continue
        points = sorted(
            (r["llm_flops_ratio"], 100 * r["accuracy"]) for r in ok + reference if r["method"] in (method, "none")
        )
        axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set_xlabel("LLM prefill FLOPs / unreduced (measured, 2 x MAC)")
    axis.set_ylabel("exact-match accuracy (%)")
    axis.set_title(title, fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(figure)

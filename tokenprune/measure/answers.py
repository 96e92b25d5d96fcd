"""Answers of a vision-language model to (image, question) rows, and their scores; one code path for
``tokenprune eval`` and the lmms-eval plugin, so the two agree on the same questions.

* **Prompt**: the zoo's LLaVA models (``llava-easyvqa``, ``llava-scenes``) take their trained prompt
  (``<image> question answer :``, style ``"easyvqa"``); any other model its
  processor's chat template (one image, then the question, generation prompt added); a processor without a
  template gets ``<image token> question``.
* **Generation**: greedy, prompts grouped by token length (a batch holds no padding, so batching cannot change
  an answer), answers decoded without special tokens, cut at the first ``until`` string.
* **Scores**: exact match of the normalised answer (lower case, outer punctuation and articles kept, spaces
  collapsed) with the reference (any of a list), and VQA soft accuracy: with n >= 2 reference answers, the mean
  over the n leave-one-out subsets of ``min(1, matches / 3)`` (the VQA benchmark's formula); one reference:
  exact match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenprune.optional import require

EASYVQA = "easyvqa"


def prompt_text(processor: Any, question: str, style: str, images: int = 1) -> str:
    """The text the processor gets for one question with ``images`` images (see the module docstring)."""
    if style == EASYVQA:
        from tokenprune.zoo.easyvqa import prompt

        return prompt(question)
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or "<image>"
    return " ".join([token] * images + [question])


def with_prompts(processor: Any, rows: list[dict[str, Any]], style: str) -> list[dict[str, Any]]:
    """``rows`` with their ``"prompt"`` text added."""
    return [{**row, "prompt": prompt_text(processor, row["question"], style)} for row in rows]


def encode(processor: Any, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch of rows: ``"prompt"`` (else easy-VQA's prompt of ``"question"``) and the
    images (``"pil"``: a list of PIL images, else the file ``"image"``)."""
    from tokenprune.measure.accuracy import load_image

    images = [image for row in rows for image in (row["pil"] if "pil" in row else [load_image(row["image"])])]
    texts = [row["prompt"] if "prompt" in row else prompt_text(processor, row["question"], EASYVQA) for row in rows]
    return processor(images=images or None, text=texts, return_tensors="pt", padding=True)


def to_model(model, inputs: Any) -> Any:
    """Processor inputs on the model's device, floating tensors (pixels) in its dtype."""
    inputs = inputs.to(model.device)
    return {k: v.to(model.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}


def batches_by_length(processor: Any, rows: Sequence[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Indices of ``rows`` in batches of equal prompt length (no padding), in first-seen order of lengths."""
    tokenizer = getattr(processor, "tokenizer", processor)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        text = row["prompt"] if "prompt" in row else prompt_text(processor, row["question"], EASYVQA)
        groups.setdefault(len(tokenizer(text)["input_ids"]), []).append(i)
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def decode(processor: Any, new_tokens: torch.Tensor, until: Sequence[str] = ()) -> list[str]:
    """Answers of ``(B, T)`` generated tokens: special tokens dropped, whitespace collapsed, cut at ``until``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = [" ".join(t.split()) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    for stop in until:
        if stop:
            texts = [t.split(stop)[0].strip() for t in texts]
    return texts


def generate_answers(
    model,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 32,
    max_new_tokens: int = 16,
    until: Sequence[str] = (),
    progress: bool = True,
    context: Any = None,
) -> list[str]:
    """Greedy answers of ``model`` (as it is, patched or not) to ``rows``, in row order.

    Args:
        context: A context manager entered around generation (e.g. the image-feature cache), or None.
    """
    from contextlib import nullcontext

    tqdm = require("tqdm.auto", "eval", "progress bars").tqdm
    answers: list[str] = [""] * len(rows)
    bar = tqdm(total=len(rows), desc="generate", unit="q", disable=not progress)
    with torch.inference_mode(), context if context is not None else nullcontext(), bar:
        for batch in batches_by_length(processor, rows, batch_size):
            inputs = to_model(model, encode(processor, [rows[i] for i in batch]))
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            for i, answer in zip(batch, decode(processor, out[:, inputs["input_ids"].shape[1] :], until), strict=True):
                answers[i] = answer
            bar.update(len(batch))
    return answers


def normalise(text: str) -> str:
    """Lower case, outer whitespace and trailing ``.`` removed, inner whitespace collapsed."""
    return " ".join(text.lower().strip().rstrip(".").split())


def references(answer: str | Sequence[str]) -> list[str]:
    """The reference answers of a row, normalised."""
    return [normalise(a) for a in ([answer] if isinstance(answer, str) else answer)]


def exact_match(prediction: str, answer: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the (any) normalised reference."""
    return float(normalise(prediction) in references(answer))


def vqa_soft_accuracy(prediction: str, answer: str | Sequence[str]) -> float:
    """VQA accuracy: mean over leave-one-out subsets of ``min(1, matches / 3)``; one reference: exact match."""
    refs = references(answer)
    if len(refs) < 2:
        return exact_match(prediction, answer)
    guess = normalise(prediction)
    hits = [ref == guess for ref in refs]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(refs)


def score(rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, Any]:
    """Exact-match ``accuracy``, ``vqa_accuracy``, counts, and accuracy per reference answer (string answers);
    rows with a ``"family"`` (question type) add ``accuracy_per_family`` and ``family_average`` (their mean)."""
    exact = [exact_match(a, row["answer"]) for row, a in zip(rows, answers, strict=True)]
    soft = [vqa_soft_accuracy(a, row["answer"]) for row, a in zip(rows, answers, strict=True)]
    per_answer: dict[str, list[float]] = {}
    for row, hit in zip(rows, exact, strict=True):
        if isinstance(row["answer"], str):
            per_answer.setdefault(row["answer"], []).append(hit)
    per_family: dict[str, list[float]] = {}
    for row, hit in zip(rows, exact, strict=True):
        if "family" in row:
            per_family.setdefault(row["family"], []).append(hit)
    n = max(1, len(rows))
    families = {f: sum(v) / len(v) for f, v in sorted(per_family.items())}
    extra = {"accuracy_per_family": families, "family_average": sum(families.values()) / max(1, len(families))}
    return {
        **(extra if families else {}),
        "accuracy": sum(exact) / n,
        "vqa_accuracy": sum(soft) / n,
        "correct": int(sum(exact)),
        "questions": len(rows),
        "accuracy_per_answer": {a: sum(v) / len(v) for a, v in sorted(per_answer.items())},
    }

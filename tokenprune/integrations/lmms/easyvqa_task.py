"""``tokenprune_easyvqa``: the easy-VQA test questions as an lmms-eval task, from local files (offline).

The questions, answers and images come from the ``easy-vqa`` package (``pip install 'tokenprune[vqa]'``), in its
order (lmms-eval's ``--limit N`` takes the first N). The prompt is the question alone: the ``tokenprune`` model
builds the model's own prompt around it (:func:`tokenprune.measure.answers.prompt_text`), as ``tokenprune eval``
does, so on the same questions the two give the same answers. Metrics: ``exact_match`` (what ``tokenprune eval``
reports as ``accuracy``) and ``vqa_accuracy`` (:mod:`tokenprune.measure.answers`).
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.task import ConfigurableTask

from tokenprune.measure.accuracy import load_image
from tokenprune.measure.answers import exact_match, vqa_soft_accuracy

TASK_NAME = "tokenprune_easyvqa"


def doc_to_visual(doc: dict[str, Any]) -> list:
    return [load_image(doc["image"])]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    prediction = results[0] if results else ""
    return {
        "exact_match": exact_match(prediction, doc["answer"]),
        "vqa_accuracy": vqa_soft_accuracy(prediction, doc["answer"]),
    }


CONFIG: dict[str, Any] = {
    "task": TASK_NAME,
    "test_split": "test",
    "output_type": "generate_until",
    "doc_to_visual": doc_to_visual,
    "doc_to_text": doc_to_text,
    "doc_to_target": "answer",
    "process_results": process_results,
    "generation_kwargs": {"until": [], "do_sample": False},  # max_new_tokens: the model's own (llava-easyvqa: 2)
    "metric_list": [
        {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
        {"metric": "vqa_accuracy", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}


class EasyVQATask(ConfigurableTask):
    """lmms-eval's configurable task over the easy-VQA test questions (no dataset download)."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        own = {k: v for k, v in (config or {}).items() if k not in ("class",)}
        super().__init__(config={**CONFIG, **own}, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        import datasets

        from tokenprune.measure.tasks.vqa import load_questions

        rows = [{k: row[k] for k in ("index", "question", "answer", "image")} for row in load_questions("test")]
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
        self.dataset_no_image = self.dataset

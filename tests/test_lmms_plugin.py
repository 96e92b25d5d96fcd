"""The lmms-eval plugin: the ``tokenprune`` model is registered through the entry point, and the shipped local task
``tokenprune_easyvqa`` scores a reduced ``llava-easyvqa`` exactly as ``tokenprune eval`` does on the same questions.

Needs the ``[lmms]`` extra (``pip install -e ".[lmms]"``) and easy-vqa; skipped without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason='the lmms-eval plugin needs the [lmms] extra: pip install -e ".[lmms]"')
pytest.importorskip("easy_vqa", reason="tokenprune_easyvqa reads the easy-vqa package: pip install -e '.[vqa]'")

QUESTIONS = 4
MODEL_ARGS = "pretrained=llava-easyvqa,method=aim,flops=0.14"


def test_the_entry_point_registers_the_tokenprune_model():
    from lmms_eval.models import get_model

    from tokenprune.integrations.lmms.model import TokenPrune

    assert get_model("tokenprune") is TokenPrune


def test_shipped_task_scores_like_tokenprune_eval_on_the_same_questions(tmp_path: Path, capsys):
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    import tokenprune
    from tokenprune.cli import main
    from tokenprune.integrations.lmms import TASKS_DIR
    from tokenprune.measure.answers import generate_answers, with_prompts
    from tokenprune.measure.tasks.vqa import load_questions

    torch.manual_seed(0)
    rows = load_questions("test")[:QUESTIONS]  # lmms-eval's --limit takes the task's first documents
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("image", "question", "answer")}) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    main(["eval", "--model", "llava-easyvqa", "--data", str(data), "--method", "aim", "--flops", "0.14",
          "--bench-rounds", "0", "--batch-size", "8", "--out", str(out)])  # fmt: skip
    ours = json.loads(out.read_text())

    manager = TaskManager("WARNING", include_path=str(TASKS_DIR))
    assert "tokenprune_easyvqa" in manager.all_tasks
    results = simple_evaluate(
        model="tokenprune", model_args=MODEL_ARGS, tasks=["tokenprune_easyvqa"], limit=QUESTIONS, batch_size=8,
        device="cpu", task_manager=manager, bootstrap_iters=0, verbosity="WARNING",
    )  # fmt: skip
    scores = results["results"]["tokenprune_easyvqa"]
    assert ours["questions"] == QUESTIONS
    assert scores["exact_match,none"] == pytest.approx(ours["accuracy"])
    assert scores["vqa_accuracy,none"] == pytest.approx(ours["vqa_accuracy"])
    # Answer by answer: the plugin's are those of the shared generation path on the reduced model.
    samples = sorted(results["samples"]["tokenprune_easyvqa"], key=lambda s: s["doc_id"])
    model, processor = tokenprune.load_model("llava-easyvqa")
    patch = tokenprune.apply(model, "aim", flops=0.14)
    expected = generate_answers(model, processor, with_prompts(processor, rows, "easyvqa"), 8, 2, progress=False)
    patch.remove()
    assert [s["filtered_resps"][0] for s in samples] == expected
    assert [s["doc"]["question"] for s in samples] == [r["question"] for r in rows]


def test_tasks_folder_is_printed_for_include_path(capsys):
    import runpy

    from tokenprune.integrations.lmms import TASKS_DIR

    runpy.run_module("tokenprune.integrations.lmms", run_name="__main__")
    assert capsys.readouterr().out.strip() == str(TASKS_DIR)
    assert (TASKS_DIR / "tokenprune_easyvqa" / "tokenprune_easyvqa.yaml").is_file()

"""``llava-scenes``: registered as a VQA model, its test questions come from fixed seeds (no data files), and
``tokenprune eval --model llava-scenes`` runs end to end on a checkpoint in the training script's format (here:
random decoder weights, so only the plumbing and the per-family scores are checked, not accuracy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tokenprune import zoo
from tokenprune.measure.answers import score
from tokenprune.measure.tasks.vqa import load_scene_questions
from tokenprune.zoo import llava_scenes as L
from tokenprune.zoo import scenes as S

REPO = Path(__file__).resolve().parents[1]


def test_registered_as_a_vqa_model_with_its_own_questions():
    assert "llava-scenes" in zoo.available_models() and zoo.task_of("llava-scenes") == "vqa"
    entry = zoo.get_entry("llava-scenes")
    assert entry.dataset == "scenes" and entry.max_new_tokens == 3  # "42" is "4 ##2 </s>"


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/train_llava_scenes.py"):
        L.load_llava_scenes(tmp_path)


def test_test_questions_are_fixed_by_their_seeds():
    rows = load_scene_questions("test", scenes=20)
    again = load_scene_questions("test", scenes=20)
    assert [(r["question"], r["answer"], r["seed"]) for r in rows] == [
        (r["question"], r["answer"], r["seed"]) for r in again
    ]
    assert {r["seed"] for r in rows} == set(S.split_scenes("test", 20))  # test seeds only
    assert {r["family"] for r in rows} <= set(S.FAMILIES) and rows[0]["pil"][0].size == (336, 336)
    subset = load_scene_questions("test", limit=30, scenes=20)
    assert len(subset) == 30 and all(r in [{**x, "pil": r["pil"]} for x in rows] for r in subset)


def test_scores_per_family():
    rows = [{"answer": "3", "family": "count"}, {"answer": "no", "family": "exist"}, {"answer": "4", "family": "count"}]
    result = score(rows, ["3", "yes", "1"])
    assert result["accuracy_per_family"] == {"count": 0.5, "exist": 0.0}
    assert result["family_average"] == 0.25 and result["correct"] == 1


def test_eval_runs_on_a_checkpoint_in_the_training_format(tmp_path):
    from tokenprune.cli import main

    sys.path.insert(0, str(REPO / "models"))
    import train_llava_scenes as T
    from llava_builders import save_pretrained

    model, processor = T.build(seed=0)
    save_pretrained(model, processor, tmp_path / "ckpt", {"note": "random decoder"}, spec=L)
    out = tmp_path / "eval.json"
    main(
        ["eval", "--model", "llava-scenes", "--checkpoint", str(tmp_path / "ckpt"), "--method", "visionzip"]
        + ["--set", "tokens=64", "--limit", "6", "--bench-rounds", "0", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["questions"] == 6 and set(result["accuracy_per_family"]) <= set(S.FAMILIES)
    assert result["tokens_per_layer_first_prompt"][0][0] < L.VISUAL_TOKENS  # 64 of 576 visual tokens + text

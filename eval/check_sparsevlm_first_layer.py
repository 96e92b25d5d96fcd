"""Why sparsevlm's default first stage is never before layer 1 on a shallow LLM, checked on easy-VQA *train* questions.

Their stages (after layers 2, 6, 15 of 32) scaled to llava-easyvqa's 8 layers put the first one after layer 0.
This scores ``ratio=0.5`` with stages after 0/2/4 and after 1/2/4 on a seeded subset of 200 easy-VQA train
questions (never the test split the README's tables use), through ``tokenprune eval`` on a JSONL of them.

Writes eval/results/sparsevlm_first_layer.json. Run: python eval/check_sparsevlm_first_layer.py
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUESTIONS, SEED = 200, 0
STAGES = {"after 0/2/4 (their layers scaled)": [0, 2, 4], "after 1/2/4 (the default)": [1, 2, 4]}


def train_questions(folder: Path) -> Path:
    """A JSONL of ``QUESTIONS`` seeded easy-VQA train questions with absolute image paths."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    chosen = sorted(random.Random(SEED).sample(range(len(questions)), QUESTIONS))
    path = folder / "train_questions.jsonl"
    with path.open("w") as f:
        for i in chosen:
            row = {"image": str(Path(paths[image_ids[i]]).resolve()), "question": questions[i], "answer": answers[i]}
            f.write(json.dumps(row) + "\n")
    return path


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = train_questions(Path(tmp))
        for name, layers in STAGES.items():
            out = Path(tmp) / "result.json"
            command = [sys.executable, "-m", "tokenprune.cli", "eval", "--model", "llava-easyvqa", "--data", str(data)]
            command += ["--method", "sparsevlm", "--set", "ratio=0.5", "--set", f"layers={json.dumps(layers)}"]
            command += ["--batch-size", "32", "--bench-rounds", "0", "--out", str(out)]
            subprocess.run(command, check=True)
            result = json.loads(out.read_text())
            results[name] = {"layers": layers, "accuracy": result["accuracy"], "n": QUESTIONS}
            print(f"{name}: {100 * result['accuracy']:.1f}% of {QUESTIONS} train questions")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"split": "train", "questions": QUESTIONS, "seed": SEED, "method": "sparsevlm ratio=0.5"}
    (RESULTS / "sparsevlm_first_layer.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

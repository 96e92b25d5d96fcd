"""Question counts and chance rates per family of the ``llava-scenes`` test split (2,000 scenes, fixed seeds).

    python eval/scenes_chance.py        # writes eval/results/llava_scenes/chance.json

Chance: what always answering the family's most frequent test answer would score (the yardstick's floor).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tokenprune.measure.tasks.vqa import SCENE_TEST_IMAGES
from tokenprune.zoo.scenes import FAMILIES, chance_rates, make_scene, questions_for, split_scenes

OUT = Path(__file__).resolve().parent / "results" / "llava_scenes" / "chance.json"


def main() -> None:
    questions = [q for seed in split_scenes("test", SCENE_TEST_IMAGES) for q in questions_for(make_scene(seed))]
    counts = Counter(q.family for q in questions)
    chance = chance_rates(questions)
    majority = {
        f: Counter(q.answer for q in questions if q.family == f).most_common(1)[0][0] for f in FAMILIES if counts[f]
    }
    result = {
        "scenes": SCENE_TEST_IMAGES,
        "questions": len(questions),
        "per_family": {
            f: {"questions": counts[f], "chance": chance[f], "majority_answer": majority[f]} for f in FAMILIES
        },
        "chance_overall": sum(chance[f] * counts[f] for f in FAMILIES) / len(questions),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print("| family | questions | chance % | majority answer |\n|---|---|---|---|")
    for f in FAMILIES:
        row = result["per_family"][f]
        print(f"| {f} | {row['questions']} | {100 * row['chance']:.1f} | {row['majority_answer']} |")
    print(f"| all | {len(questions)} | {100 * result['chance_overall']:.1f} | |")


if __name__ == "__main__":
    main()

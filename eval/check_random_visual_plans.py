"""Check: charging ``random_visual`` no scoring row (it computes none) leaves every plan of the easy-VQA sweep as is.

``random_visual`` is FastV's schedule with random tokens; a FLOPs budget solves its keep fraction from its own
cost. For every test prompt of ``eval/run_easyvqa_sweep.sh`` (1,000 questions, the shipped llava-easyvqa) and
every budget and K it runs, this compares the plan solved with FastV's one scoring row charged and with none.

    python eval/check_random_visual_plans.py        # prints the shapes checked and how many plans differ
"""

from __future__ import annotations

import tokenprune
from tokenprune.measure.tasks.vqa import encode, load_questions
from tokenprune.methods.random_visual import RandomVisual, RandomVisualConfig

BUDGETS = (0.5, 0.35, 0.3, 0.2, 0.14)


def main() -> None:
    model, processor = tokenprune.load_model("llava-easyvqa")
    adapter = tokenprune.registry.find_adapter(model)(model)
    rows = load_questions("test", 1000)
    shapes = set()
    for start in range(0, len(rows), 100):
        encoded = encode(processor, rows[start : start + 100])
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True):
            visual = int(((ids == model.config.image_token_id) & mask.bool()).sum())
            shapes.add((visual, int(mask.sum()) - visual))
    checked = differing = 0
    for visual, text in sorted(shapes):
        for k in (2, 1):
            for budget in BUDGETS:
                method = RandomVisual(RandomVisualConfig(k=k, flops=budget))
                plans = []
                for charged in (1, 0):

                    def cost(plan, charged=charged, text=text, visual=visual):
                        return adapter.llm_flops.prefill(text, plan.visual_counts(visual), charged)

                    try:
                        plans.append(method.solve_budget(budget, adapter.depth, visual, cost).fractions)
                    except ValueError:  # below what K allows: unreachable either way
                        plans.append(None)
                checked += 1
                differing += plans[0] != plans[1]
    print(f"{len(rows)} prompts, {len(shapes)} prompt shapes; {checked} (shape, K, budget) plans; {differing} differ")


if __name__ == "__main__":
    main()

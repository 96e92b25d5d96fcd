"""The LLaVA-576 table per question family from a ``tokenprune sweep --model llava-scenes`` folder.

    python eval/llava_scenes_table.py eval/results/llava_scenes      # writes families.md beside the JSONs

One row per setting (methods in sweep order, most tokens first): exact-match accuracy of every question family,
their average, and the average as % of the unreduced model's (the literature's "retention" column), with the
LLM prefill and total GFLOPs the sweep measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenprune.zoo.scenes import FAMILIES


def rows_of(folder: Path) -> list[dict]:
    sweep = folder / "sweep.json"
    if not sweep.is_file():
        raise SystemExit(f"{sweep} is missing: run eval/run_llava_scenes_sweep.sh first")
    data = json.loads(sweep.read_text())
    return data["rows"] if isinstance(data, dict) else data


def table(rows: list[dict]) -> str:
    done = [r for r in rows if "accuracy_per_family" in r]
    base = next((r for r in done if r["method"] == "none"), None)
    if base is None:
        raise SystemExit("the folder has no finished unreduced run (method none): nothing to compare with")
    head = ["method", "tokens", *FAMILIES, "average", "% of unreduced", "GFLOPs LLM prefill", "GFLOPs total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tokens = "576" if r.get("tokens") is None else str(r["tokens"])
        if "accuracy_per_family" not in r:
            lines.append(f"| {r['method']} | {tokens} | " + " | ".join(["n/a"] * (len(head) - 2)) + " |")
            continue
        fam = [f"{100 * r['accuracy_per_family'].get(f, float('nan')):.1f}" for f in FAMILIES]
        average = r["family_average"]
        cells = [r["method"], tokens, *fam, f"{100 * average:.1f}", f"{100 * average / base['family_average']:.1f}"]
        cells += [f"{r['gflops_llm_prefill']:.3f}", f"{r['gflops_total']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    text = table(rows_of(folder))
    (folder / "families.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

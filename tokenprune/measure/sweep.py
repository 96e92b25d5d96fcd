"""The one eval loop: ``tokenprune eval`` (one setting) and ``tokenprune sweep`` (many) for every task.

A sweep writes one JSON per setting into ``--out`` as it goes, and after every setting ``sweep.json``,
``table.md`` and ``pareto.png``, so an interrupted sweep still leaves readable results; ``--resume`` keeps the
settings whose JSON is already there. What a task measures, and how its rows read, is the task's
(:mod:`tokenprune.measure.tasks`).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from tokenprune.measure.accuracy import distributed_context
from tokenprune.measure.options import emit, model_label, setting_label, summary_table
from tokenprune.measure.tasks.base import Loaded, Setting, Task
from tokenprune.methods.variants import is_control
from tokenprune.optional import require


def _filed(task_row: dict[str, Any], setting: Setting, args: argparse.Namespace, loaded: Loaded) -> dict[str, Any]:
    task_row.update({**setting.fields, "model": model_label(args), "data": loaded.description, "limit": args.limit})
    return task_row


def run_eval(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """One setting: a short table on stdout (the JSON with ``--json``), the JSON in ``--out``; returns it."""
    rank, _ = distributed_context()
    loaded = task.load(args)
    setting = task.eval_setting(args)
    result = _filed(task.evaluate(loaded, setting, args), setting, args, loaded)
    if rank == 0:
        emit(result, args, summary_table(result, setting_label(setting.method, setting.options)))
    return result


def run_sweep(task: Task, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting of the task's sweep; JSON per run, ``sweep.json``, ``table.md``, ``pareto.png``.

    A setting that fails with ``ValueError`` (e.g. a budget the method cannot reach) is recorded, not fatal.

    Returns:
        The rows in table order.
    """
    tqdm = require("tqdm.auto", "eval", "progress bars").tqdm
    if getattr(args, "tokens", None) and not task.takes_tokens:
        raise SystemExit(
            f"--tokens (visual tokens per image) is for vision-language models; use --flops for {args.model}"
        )
    rank, _ = distributed_context()
    loaded = task.load(args)
    out_dir = Path(args.out)
    done: dict[str, dict[str, Any]] = {}
    if args.resume and task.shares_folder:  # earlier sweeps into this folder stay in the table and plot
        done = {p.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.name != "sweep.json"}
    title = task.title(args, loaded)
    ran = False
    for setting in tqdm(task.settings(loaded, args, done), desc="sweep", disable=rank != 0):
        path = out_dir / setting.file
        if args.resume and path.exists():
            row = json.loads(path.read_text())
        else:
            try:
                row = task.evaluate(loaded, setting, args)
            except ValueError as error:
                row = {"method": setting.method, "error": str(error)}
            row = _filed(row, setting, args, loaded)
            if rank == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=2) + "\n")
        done[setting.file] = row
        ran = True
        if rank == 0:
            task.after(loaded, setting, row, args)
            write_outputs(task, task.order(list(done.values()), args), out_dir, title)
    rows = task.order(list(done.values()), args)
    if rank == 0:
        if not (out_dir / "table.md").exists() or not ran:  # else the last setting wrote these very rows
            write_outputs(task, rows, out_dir, title)
        sys.stdout.write((out_dir / "table.md").read_text())
    return rows


def markdown_table(task: Task, rows: list[dict[str, Any]]) -> str:
    """The task's columns as a markdown table, one line per row (failed runs show their error)."""
    columns = task.table_columns(rows)
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [(c.error if "error" in row else c.cell)(row) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(task: Task, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Score vs cost, a line per method, the control as a black star."""
    matplotlib = require("matplotlib", "eval", "sweep plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = task.plot_spec(rows)
    ok = [row for row in rows if "error" not in row]
    control = [row for row in ok if is_control(row["method"])]
    figure, axis = plt.subplots(figsize=spec.size)
    for method in dict.fromkeys(row["method"] for row in ok):
        mine = [row for row in ok if row["method"] == method]
        if is_control(method):
            xs, ys = zip(*sorted((r[spec.x], 100 * r[spec.y]) for r in mine), strict=True)
            axis.scatter(xs, ys, marker="*", s=160, color="black", label=f"{method} (unreduced)", zorder=3)
            continue
        points = sorted((r[spec.x], 100 * r[spec.y]) for r in mine + (control if spec.through_control else []))
        axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set_xlabel(spec.xlabel)
    axis.set_ylabel(spec.ylabel)
    # Long data paths would be cut off.
    axis.set_title("\n".join(textwrap.wrap(title, spec.wrap)) if spec.wrap else title, fontsize=spec.title_size)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(task: Task, rows: list[dict[str, Any]], out_dir: Path, title: str) -> None:
    """``sweep.json``, ``table.md`` and ``pareto.png`` of ``rows`` (already in table order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "table.md").write_text(markdown_table(task, rows))
    pareto_plot(task, rows, out_dir / "pareto.png", title)

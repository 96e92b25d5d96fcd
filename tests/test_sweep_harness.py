"""The one eval loop (``tokenprune.measure.sweep``) and the task protocol, on a fake task and on each task's
settings (no model runs here: the tasks' evaluations are tested in test_cli_eval, test_dtop, test_llava_easyvqa)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import tokenprune
from tokenprune.measure import sweep
from tokenprune.measure.tasks import Column, Loaded, PlotSpec, Setting, Task, task_for
from tokenprune.measure.tasks.base import budget_settings
from tokenprune.methods import variants


class FakeTask(Task):
    """Scores a setting by its budget; budget 0.3 fails like a budget a method cannot reach."""

    columns = [
        Column("method", lambda r: r["method"], lambda r: r["method"]),
        Column("budget", lambda r: f"{r['budget']}", lambda r: f"{r['budget']}"),
        Column("score", lambda r: f"{100 * r['score']:.1f}", lambda r: r["error"]),
    ]
    plot = PlotSpec(x="cost", y="score", xlabel="cost", ylabel="score (%)")

    def __init__(self) -> None:
        self.evaluated: list[str] = []

    def load(self, args):
        return Loaded(model=None, data=None, description="fake data")

    def eval_setting(self, args):
        return Setting(args.method, {"flops": args.flops}, fields={"budget": args.flops})

    def settings(self, loaded, args, done):
        yield from budget_settings(args.methods.split(","), [float(b) for b in args.flops.split(",")],
                                   lambda name, budget: {"flops": budget})  # fmt: skip

    def evaluate(self, loaded, setting, args):
        self.evaluated.append(setting.file)
        budget = setting.options["flops"]
        if budget == 0.3:
            raise ValueError("budget 0.3 is out of reach")
        return {"method": setting.method, "cost": budget, "score": 1.0 - (1.0 - budget) / 2}


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = {"model": "fake", "methods": "none,tome", "flops": "1,0.5", "set": None, "out": str(tmp_path),
            "resume": False, "limit": 3, "checkpoint": None, "method": "tome"}  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_sweep_writes_json_per_run_table_and_plot_and_resumes(tmp_path: Path, capsys) -> None:
    task = FakeTask()
    rows = sweep.run_sweep(task, _args(tmp_path))
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 1.0), ("tome", 0.5)]
    assert rows[1] | {} == {"method": "tome", "cost": 0.5, "score": 0.75, "budget": 0.5, "model": "fake",
                            "data": "fake data", "limit": 3}  # fmt: skip
    assert json.loads((tmp_path / "tome_0.5.json").read_text()) == rows[1]
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    table = (tmp_path / "table.md").read_text()
    assert table.splitlines()[:2] == ["| method | budget | score |", "|---|---|---|"]
    assert "| tome | 0.5 | 75.0 |" in table and table in capsys.readouterr().out
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    # --resume: finished settings are read back, not rerun; a failing setting is recorded, not fatal.
    before = (tmp_path / "tome_0.5.json").stat().st_mtime_ns
    task.evaluated.clear()
    rows = sweep.run_sweep(task, _args(tmp_path, flops="1,0.5,0.3", resume=True))
    assert task.evaluated == ["tome_0.3.json"]
    assert (tmp_path / "tome_0.5.json").stat().st_mtime_ns == before
    assert rows[-1]["error"] == "budget 0.3 is out of reach"
    assert "| tome | 0.3 | budget 0.3 is out of reach |" in (tmp_path / "table.md").read_text()


def test_sweep_without_resume_reruns_everything(tmp_path: Path) -> None:
    task = FakeTask()
    sweep.run_sweep(task, _args(tmp_path))
    task.evaluated.clear()
    sweep.run_sweep(task, _args(tmp_path))
    assert task.evaluated == ["none_1.0.json", "tome_0.5.json"]


def test_shared_folder_keeps_earlier_sweeps_on_resume(tmp_path: Path) -> None:
    class Shared(FakeTask):
        shares_folder = True

        def order(self, rows, args):
            return sorted(rows, key=lambda r: (r["method"], -r["budget"]))

    task = Shared()
    sweep.run_sweep(task, _args(tmp_path, methods="tome", flops="0.5"))
    rows = sweep.run_sweep(task, _args(tmp_path, methods="tome", flops="0.7", resume=True))
    assert [r["budget"] for r in rows] == [0.7, 0.5]


def test_eval_runs_one_setting_and_files_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "one.json"
    result = sweep.run_eval(FakeTask(), _args(tmp_path, flops=0.5, out=str(out), checkpoint="mine.safetensors"))
    assert result["model"] == "fake @ mine.safetensors" and result["budget"] == 0.5
    assert json.loads(out.read_text()) == result
    # stdout: a table a person reads (the setting on its row); --json: the full JSON instead.
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| setting | accuracy | GFLOPs") and lines[2].startswith("| tome flops=0.5 |")
    sweep.run_eval(FakeTask(), _args(tmp_path, flops=0.5, out=None, checkpoint="mine.safetensors", json=True))
    assert json.loads(capsys.readouterr().out) == result


def test_table_order_without_methods_is_first_seen() -> None:
    rows = [{"method": "tome", "budget": 0.5}, {"method": "none", "budget": 1.0}, {"method": "tome", "budget": 0.7}]
    ordered = FakeTask().order(rows, argparse.Namespace())
    assert [(r["method"], r["budget"]) for r in ordered] == [("tome", 0.7), ("tome", 0.5), ("none", 1.0)]


def test_budget_settings_run_the_control_only_unreduced() -> None:
    settings = budget_settings(["none", "tome"], [1, 0.5, 0.4], lambda name, budget: {"flops": budget})
    assert [(s.method, s.fields["budget"], s.file) for s in settings] == [
        ("none", 1.0, "none_1.0.json"),
        ("tome", 0.5, "tome_0.5.json"),
        ("tome", 0.4, "tome_0.4.json"),
    ]


def test_each_model_has_its_task_and_every_task_its_protocol() -> None:
    for model in tokenprune.available_models():
        task = task_for(model)
        assert isinstance(task, Task) and task.columns and task.plot.x and task.plot.y


def test_classification_settings_default_to_every_vit_method(tmp_path: Path) -> None:
    task = task_for("vit-s14-imagenette")
    args = _args(tmp_path, methods=None, flops="1,0.5", set=["prop_attn=false"])
    settings = list(task.settings(None, args, {}))
    names = tokenprune.methods(kind="vit")
    assert [s.method for s in settings] == ["none"] + [n for n in names if n != "none"]
    assert settings[0].options == {"prop_attn": False, "flops": 1.0}


def test_segmentation_matches_baselines_to_each_early_exit_setting(tmp_path: Path) -> None:
    task = task_for("vit-s14-camvid")
    args = _args(tmp_path, methods="none,dtop,tome", flops="match", set=["threshold=[0.9,[0.98,0.9]]"])
    done: dict[str, dict] = {}
    settings = task.settings(None, args, done)
    first = [next(settings) for _ in range(3)]
    assert [s.file for s in first] == ["none.json", "dtop_threshold0.9.json", "dtop_threshold0.98-0.9.json"]
    assert first[2].fields == {"setting": "threshold=0.98-0.9"} and first[2].options == {"threshold": [0.98, 0.9]}
    done.update({"dtop_threshold0.9.json": {"flops_ratio": 0.51234}, "dtop_threshold0.98-0.9.json": {"error": "x"}})
    rest = list(settings)
    assert [(s.file, s.options) for s in rest] == [("tome_flops0.5123.json", {"flops": 0.5123})]


def test_vqa_accepts_registered_vlm_methods_and_their_variants(tmp_path: Path) -> None:
    task = task_for("llava-easyvqa")
    args = _args(tmp_path, methods="none,aim_prune,random", flops="1,0.35", set=None)
    settings = list(task.settings(None, args, {}))
    assert [(s.method, s.options) for s in settings] == [
        ("none", {}), ("aim_prune", {"flops": 0.35}), ("random", {"flops": 0.35})
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown method 'evit' for a vlm model"):
        list(task.settings(None, _args(tmp_path, methods="none,evit"), {}))
    assert task.eval_setting(_args(tmp_path, method="random", flops=0.3, set=None)).method == "random_visual"


def test_variants_name_registered_methods_of_their_kind() -> None:
    assert set(tokenprune.methods(kind="vlm")) <= set(variants.names("vlm"))
    for name, variant in variants.VARIANTS.items():
        method, resolved = variants.resolve(name, "vlm")
        assert method == variant.method and "vlm" in tokenprune.registry.get_method(method).kinds
        assert set(resolved.options) <= set(tokenprune.registry.get_method(method).config_cls.field_names())
    assert variants.resolve("random", "vit") == ("random", variants.Variant("random"))
    assert [m for m in tokenprune.methods() if variants.is_control(m)] == ["none"]


def test_missing_optional_dependency_names_the_extra() -> None:
    from tokenprune.optional import require

    with pytest.raises(ImportError, match=r"pip install 'tokenprune\[eval\]'"):
        require("no_such_module_for_tokenprune", "eval", "sweep plots")


def test_tokens_axis_is_refused_by_tasks_that_take_budgets(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--tokens .* is for vision-language models; use --flops"):
        sweep.run_sweep(FakeTask(), _args(tmp_path, tokens="48,16"))
    assert task_for("llava-easyvqa").takes_tokens and not task_for("vit-s14-imagenette").takes_tokens

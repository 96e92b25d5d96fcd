"""CLI (bench / eval / sweep) and the eval harness, on small random-weight models (no trained weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.cli import main
from tokenprune.measure.options import parse_set

SCRIPTS = Path(__file__).parent / "scripts"


def test_parse_set_reads_json_values():
    assert parse_set(["r=8", "prop_attn=False", "r_list=[1, 2]", "name=abc"]) == {
        "r": 8,
        "prop_attn": False,
        "r_list": [1, 2],
        "name": "abc",
    }
    with pytest.raises(SystemExit, match="key=value"):
        parse_set(["r8"])


def test_eval_without_data_reports_agreement_flops_and_speed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TOKENPRUNE_DATA", raising=False)
    out = tmp_path / "result.json"
    main(
        [
            "eval",
            "--model",
            "deit_tiny_patch16_224",
            "--method",
            "tome",
            "--flops",
            "0.5",
            "--batch-size",
            "2",
            "--bench-rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["n"] == 5 and 0 <= result["top1_agreement"] <= 1 and -1 <= result["feature_cosine"] <= 1
    assert result["flops_ratio"] == pytest.approx(0.5, abs=0.01)
    assert result["gflops_per_image"] < result["gflops_per_image_unreduced"]
    assert result["images_per_s_patched"] > 0 and result["speedup"] > 0
    assert result["config"]["flops"] == 0.5 and len(result["schedule"]) == 12


def test_eval_options_are_validated(monkeypatch):
    monkeypatch.delenv("TOKENPRUNE_DATA", raising=False)
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['rr'\]"):
        main(["eval", "--model", "deit_tiny_patch16_224", "--method", "tome", "--set", "rr=3", "--bench-rounds", "0"])
    with pytest.raises(SystemExit, match=r"flops budget must be in \(0, 1\]"):
        main(["eval", "--model", "deit_tiny_patch16_224", "--method", "tome", "--flops", "1.5", "--bench-rounds", "0"])


def test_set_file_options_reach_the_method_and_set_goes_on_top(tmp_path, monkeypatch):
    """A calibrate --out file (its ``config``) is the method's options; --set overrides; another method's refused."""
    monkeypatch.delenv("TOKENPRUNE_DATA", raising=False)
    schedule = [4, 3, 2, 1] + [0] * 8
    set_file = tmp_path / "schedule.json"
    set_file.write_text(json.dumps({"method": "tome", "config": {"r": schedule, "prop_attn": False}}))
    out = tmp_path / "result.json"
    base = ["eval", "--model", "deit_tiny_patch16_224", "--batch-size", "2", "--bench-rounds", "0", "--out", str(out)]
    main([*base, "--method", "tome", "--set-file", str(set_file), "--set", "prop_attn=true"])
    result = json.loads(out.read_text())
    assert result["config"]["r"] == schedule and result["config"]["prop_attn"] is True
    with pytest.raises(SystemExit, match="calibrated for method 'tome', not 'evit'"):
        main([*base, "--method", "evit", "--set-file", str(set_file)])


def test_eval_with_a_wrongly_laid_out_dataset_shows_the_layout(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(SystemExit) as info:
        main(
            [
                "eval",
                "--model",
                "vit-s14-imagenette",
                "--method",
                "tome",
                "--data",
                str(tmp_path),
                "--bench-rounds",
                "0",
            ]
        )
    assert "imagenette" in str(info.value) and "val" in str(info.value)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit, match="not a tokenprune zoo name nor a timm architecture"):
        main(["bench", "--model", "no_such_model", "--method", "tome", "--set", "r=2"])


def test_sweep_writes_json_table_and_pareto_plot(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENPRUNE_DATA", raising=False)

    def sweep(flops: str, *extra: str) -> list[dict]:
        main(
            ["sweep", "--model", "deit_tiny_patch16_224", "--methods", "none,tome,random", "--flops", flops]
            + ["--batch-size", "2", "--bench-rounds", "0", "--out", str(tmp_path), *extra]
        )
        return json.loads((tmp_path / "sweep.json").read_text())

    rows = sweep("1,0.6")
    assert [(row["method"], row["budget"]) for row in rows] == [("none", 1.0), ("tome", 0.6), ("random", 0.6)]
    assert rows[0]["top1_agreement"] == 1.0 and rows[0]["feature_cosine"] == pytest.approx(1.0)
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert "| tome | 0.6 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "tome_0.6.json").exists()
    # --resume keeps finished settings (their files are not rewritten) and adds the new ones.
    before = (tmp_path / "tome_0.6.json").stat().st_mtime_ns
    rows = sweep("0.6,0.7,1", "--resume")
    assert [(row["method"], row["budget"]) for row in rows] == [
        ("none", 1.0),
        ("tome", 0.7),
        ("tome", 0.6),
        ("random", 0.7),
        ("random", 0.6),
    ]
    assert (tmp_path / "tome_0.6.json").stat().st_mtime_ns == before


def test_bench_writes_side_by_side_json(tmp_path):
    out = tmp_path / "bench.json"
    main(
        [
            "bench",
            "--model",
            "deit_tiny_patch16_224",
            "--method",
            "tome",
            "--set",
            "r=8",
            "--batch-size",
            "2",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["schedule"] == [8] * 12 and result["flops_ratio"] < 1
    assert len(result["seconds_unpatched"]) == len(result["seconds_patched"]) == 1


def test_torchrun_shards_and_reduces_across_two_processes():
    from tests.scripts.distributed_eval import Tiny, dataset
    from tokenprune.measure.accuracy import evaluate_dataset

    single = evaluate_dataset(Tiny(), dataset(), batch_size=5, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            str(SCRIPTS / "distributed_eval.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[:3000]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["world"] == 2
    assert (result["correct"], result["n"]) == (single["correct"], single["n"]) == (result["correct"], 37)

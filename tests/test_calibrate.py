"""``tokenprune.calibrate``: budget, determinism, JSON round trip, lower divergence than the constant rate, errors.

A tiny timm ViT (36 patches + class token, 4 blocks) with random weights and a few random images: the search is
scored on them exactly as on real data, only smaller.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tokenprune
from tokenprune import registry
from tokenprune.calibrate import add_calibrate_command, calibrate, calibrate_report, load_set_file
from tokenprune.core.calibrate import ScheduleSpace, search_schedule

METHODS = [m for m in tokenprune.methods(kind="vit") if not registry.get_method(m).method_cls.control]


def tiny(num_classes: int = 10, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=48, patch_size=8, embed_dim=48, depth=4, num_heads=2, num_classes=num_classes)
    return vit.eval()


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


def kl(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(x).double()
    reference = reference.double()
    return float(F.kl_div(out.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.75, 0.5])
def test_budget_lands_within_two_percent(method, budget):
    model, x = tiny(), images(4)
    config = calibrate(model, method, flops=budget, images=x, max_evals=5, progress=False)
    baseline = tokenprune.count_flops(model, x[:1]).measured
    patch = tokenprune.apply(model, method, **config)
    measured = tokenprune.count_flops(model, x[:1]).measured / baseline
    assert measured == pytest.approx(budget, rel=0.02)
    assert patch.schedule == config["r"] and len(config["r"]) == 4


def test_deterministic_for_a_seed_and_same_from_a_dataloader():
    model, x = tiny(), images(4)
    first = calibrate(model, "tome", flops=0.5, images=x, seed=3, max_evals=9, progress=False)
    again = calibrate(model, "tome", flops=0.5, images=x, seed=3, max_evals=9, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(4)), batch_size=3)
    from_loader = calibrate(model, "tome", flops=0.5, images=loader, seed=3, max_evals=9, progress=False)
    assert first == again == from_loader


def test_config_round_trips_through_json_and_apply():
    model, x = tiny(), images(4)
    config = calibrate(model, "evit", flops=0.6, images=x, max_evals=6, progress=False, prop_attn=True)
    loaded = json.loads(json.dumps(config))
    assert loaded == config and loaded["prop_attn"] is True
    patch = tokenprune.apply(model, "evit", **loaded)
    assert patch.schedule == config["r"] and patch.config.prop_attn
    with torch.no_grad():
        out = model(x)
    assert [e.tokens_in - e.tokens_out for e in patch.state.log] == config["r"]
    assert out.shape == (4, 10)


def test_calibrated_schedule_lowers_the_divergence_against_the_constant_one():
    """Measured again here, apart from the search: KL to the unreduced logits on the calibration images."""
    model, x = tiny(), images(8)
    report = calibrate_report(model, "tome", flops=0.5, images=x, max_evals=12, progress=False)
    with torch.no_grad():
        reference = model(x)
    patch = tokenprune.apply(model, "tome", flops=0.5)
    constant = kl(model, x, reference)
    assert patch.schedule == report.constant_schedule
    patch.remove()
    patch = tokenprune.apply(model, "tome", **report.config)
    calibrated = kl(model, x, reference)
    patch.remove()
    assert report.objective == "kl"
    assert constant == pytest.approx(report.constant_divergence, rel=1e-3)
    assert calibrated == pytest.approx(report.divergence, rel=1e-3)
    assert calibrated < constant
    assert report.flops_ratio == pytest.approx(0.5, rel=0.005)


def test_backbone_without_head_uses_feature_distortion():
    model, x = tiny(num_classes=0), images(4)
    report = calibrate_report(model, "tome", flops=0.6, images=x, max_evals=6, progress=False)
    assert report.objective == "feature"
    assert 0 <= report.divergence <= report.constant_divergence


def test_bad_budgets_images_methods_and_schedules_raise_clearly():
    model, x = tiny(), images(2)
    for budget in (0.0, 1.5, -0.2, "0.5", True):
        with pytest.raises(ValueError, match=r"flops budget must be a number in \(0, 1\]"):
            calibrate(model, "tome", flops=budget, images=x, progress=False)
    with pytest.raises(ValueError, match="valid budgets are in"):
        calibrate(model, "tome", flops=0.02, images=x, progress=False)
    for empty in (None, torch.empty(0, 3, 48, 48), []):
        with pytest.raises(ValueError, match="images|empty image set"):
            calibrate(model, "tome", flops=0.5, images=empty, progress=False)
    with pytest.raises(TypeError, match=r"\(N, C, H, W\)"):
        calibrate(model, "tome", flops=0.5, images=torch.randn(3, 48, 48), progress=False)
    with pytest.raises(ValueError, match="removes no tokens"):
        calibrate(model, "none", flops=0.5, images=x, progress=False)
    with pytest.raises(ValueError, match="does not reduce ViT tokens"):
        calibrate(model, "fastv", flops=0.5, images=x, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        calibrate(model, "nope", flops=0.5, images=x, progress=False)
    with pytest.raises(ValueError, match="chooses the schedule itself"):
        calibrate(model, "tome", flops=0.5, images=x, progress=False, r=2)
    with pytest.raises(ValueError, match="max_evals"):
        calibrate(model, "tome", flops=0.5, images=x, progress=False, max_evals=0)
    patch = tokenprune.apply(model, "tome", r=1)
    with pytest.raises(RuntimeError, match="already patched"):
        calibrate(model, "tome", flops=0.5, images=x, progress=False)
    patch.remove()
    # A (hand-edited) config removing more tokens than a layer holds is refused by apply, naming the valid range.
    with pytest.raises(ValueError, match="out of range"):
        tokenprune.apply(model, "tome", r=[18, 18, 18, 18])


def test_search_keeps_every_candidate_in_budget_and_valid():
    model = tiny()
    patch = tokenprune.apply(model, "evit", r=1)
    adapter, method = patch.adapter, patch.runtime.method
    space = ScheduleSpace(4, 37, 1, method.max_removable, lambda s: adapter.analytic_flops(37, s, method)["total"])
    patch.remove()
    scored = []

    def objective(schedule):
        scored.append(list(schedule))
        return float(sum(i * v for i, v in enumerate(schedule)))  # prefers removing early

    result = search_schedule(space, 0.5, objective, max_evals=25, tolerance=0.01, seed=1)
    assert result.evaluations == len(scored) <= 25
    for schedule in scored:
        assert space.is_valid(schedule)
        assert space.ratio(schedule) == pytest.approx(0.5, abs=max(0.005, abs(space.ratio(result.start) - 0.5)))
    assert result.value < result.start_value and result.schedule[0] > result.start[0]
    assert space.transfer(result.start, 0, 0, 1, 0.5) is None  # a layer cannot give to itself
    assert space.transfer([0, 0, 0, 0], 1, 2, 1, 0.5) is None  # nothing to give


def test_set_file_and_cli_parser(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"r": [1, 2, 3, 4]}))
    assert load_set_file(plain) == {"r": [1, 2, 3, 4]}
    made = tmp_path / "schedule.json"
    made.write_text(json.dumps({"model": "m", "method": "tome", "config": {"r": [4, 3, 2, 1], "prop_attn": False}}))
    assert load_set_file(made, "tome") == {"r": [4, 3, 2, 1], "prop_attn": False}
    with pytest.raises(ValueError, match="calibrated for method 'tome', not 'evit'"):
        load_set_file(made, "evit")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_set_file(bad)
    parser = argparse.ArgumentParser()
    add_calibrate_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", "--model", "vit-s14-imagenette", "--method", "evit", "--out", "s.json"])
    assert (args.flops, args.split, args.limit, args.seed, args.method) == (0.35, "train", 256, 0, "evit")


@pytest.mark.slow
def test_imagenette_calibrated_script_end_to_end(tmp_path):
    """The goal-table script on a tiny subset (10 val images, 4 train images to calibrate on, 2 schedules)."""
    import importlib.util
    import os
    from pathlib import Path

    root = os.environ.get("TOKENPRUNE_DATA", "/work/shared/datasets")
    if not (Path(root) / "imagenette" / "train").is_dir():
        pytest.skip(f"no Imagenette under {root}")
    script = Path(__file__).resolve().parents[1] / "eval" / "run_imagenette_calibrated.py"
    spec = importlib.util.spec_from_file_location("run_imagenette_calibrated", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--data", root, "--methods", "tome,random", "--flops", "0.5", "--limit", "10", "--calib-images", "4"]
    argv += ["--max-evals", "2", "--bench-rounds", "0", "--no-progress", "--out", str(tmp_path)]
    assert module.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["budgets"]["0.5"]["calibrated_beats_constant"]) == {"tome", "random"}
    assert "| tome | 0.5 | calibrated |" in (tmp_path / "table.md").read_text()
    config = load_set_file(tmp_path / "tome_0.5.json", "tome")
    row = json.loads((tmp_path / "tome_calibrated_0.5.json").read_text())
    assert row["schedule"] == config["r"] and row["flops_ratio"] == pytest.approx(0.5, rel=0.02)
    assert row["calibration"]["images"] == 4 and row["n"] == 10


def test_dynamic_size_model_is_calibrated_at_the_images_size():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=48, patch_size=8, embed_dim=48, depth=4, num_heads=2, dynamic_img_size=True)
    x = torch.randn(3, 3, 40, 56)
    config = calibrate(model.eval(), "tome", flops=0.6, images=x, max_evals=3, progress=False)
    assert config["input_size"] == [40, 56]
    patch = tokenprune.apply(model, "tome", **json.loads(json.dumps(config)))
    assert patch.schedule == config["r"] and patch.adapter.num_tokens((40, 56)) == 1 + 5 * 7
    patch.remove()
    with pytest.raises(ValueError, match="does not match the calibration images"):
        calibrate(model, "tome", flops=0.6, images=x, progress=False, input_size=48)


@pytest.mark.slow
def test_calibrate_command_writes_a_set_file(tmp_path, capsys):
    import os
    from pathlib import Path

    from tokenprune.calibrate import run_calibrate

    root = os.environ.get("TOKENPRUNE_DATA", "/work/shared/datasets")
    if not (Path(root) / "imagenette" / "train").is_dir():
        pytest.skip(f"no Imagenette under {root}")
    parser = argparse.ArgumentParser()
    add_calibrate_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "schedule.json"
    argv = ["calibrate", "--model", "vit-s14-imagenette", "--method", "tome", "--flops", "0.5", "--data", root]
    args = parser.parse_args([*argv, "--limit", "4", "--max-evals", "2", "--out", str(out)])
    report = args.func(args)
    assert args.func is run_calibrate and load_set_file(out, "tome") == report.config
    saved = json.loads(out.read_text())
    assert saved["calibrated_on"] == {"dataset": "imagenette", "split": "train", "limit": 4}
    assert saved["flops_ratio"] == pytest.approx(0.5, rel=0.02)
    printed = capsys.readouterr().out  # a table a person reads, naming the file to pass on
    assert "| calibrated | " in printed and "| constant (`flops=`) | " in printed and str(out) in printed
    args = parser.parse_args([*argv, "--limit", "4", "--max-evals", "2", "--out", str(out), "--json"])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["config"] == json.loads(out.read_text())["config"]

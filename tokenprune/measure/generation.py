"""Generation metrics of a vision-language model, patched vs unpatched, measured side by side in one run.

``tokenprune bench --model <VLM> --method aim --flops 0.25 --new-tokens 32``:

* **time to first token**: wall time from calling ``generate()`` to the first new token (the prefill, vision
  tower included), read by a streamer; on CUDA every token is copied to the host, so the time includes the GPU;
* **decode tokens/s**: the ``N - 1`` tokens after the first over the time they took (``min_new_tokens = N``, so
  every run decodes exactly N tokens);
* **KV-cache bytes after prefill**: the sum over the cache's layers of the bytes of every tensor a layer holds
  (keys and values; a reduced prefill caches only the tokens each layer kept);
* **peak memory** of one ``generate()`` above the memory before it: CUDA ``max_memory_allocated`` (in the same
  process); on CPU the resident-set high-water mark of a fresh process that loads the model and runs one
  ``generate()`` (Linux ``/proc/self/clear_refs`` resets the mark; in the benchmark's own process the allocator
  would reuse earlier runs' memory and show nothing), else not measured.

Rounds alternate unpatched and patched (the patch applied and removed around its run), so machine noise hits both
alike; medians over rounds; greedy decoding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tokenprune.api import apply
from tokenprune.measure.answers import encode, prompt_text, to_model


class TokenClock:
    """A ``generate()`` streamer that records when each put arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.times.append(time.perf_counter())


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of every tensor held by the layers of a transformers cache (keys, values, any other state)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _rss_mib(field: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((line for line in status.read_text().splitlines() if line.startswith(field + ":")), None)
    return int(line.split()[1]) / 1024 if line else None


def peak_memory_mib(run: Any, device: torch.device) -> float | None:
    """Peak memory of ``run()`` above the memory before it, MiB (None where it cannot be measured).

    CUDA: allocated tensor memory. CPU (Linux): the resident-set high-water mark, meaningful in a fresh process
    only (see :func:`peak_memory_fresh_process`).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_mib("VmRSS")
    run()
    peak = _rss_mib("VmHWM")
    return None if before is None or peak is None else peak - before


def peak_memory_fresh_process(job: dict[str, Any]) -> float | None:
    """CPU peak memory of one ``generate()`` in a fresh process (``python -m tokenprune.measure.generation JOB``).

    ``job``: ``model``, ``allow_download``, ``checkpoint``, ``dtype``, ``data``, ``batch_size``, ``new_tokens``,
    ``method`` (None: unpatched), ``options``.
    """
    import json
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, "-m", "tokenprune.measure.generation", json.dumps(job)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"peak-memory process failed: {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_memory_mib"]


def _fresh_process_peak(job: dict[str, Any]) -> None:
    import json

    from tokenprune.measure.models import load_vlm, parse_model

    loaded = load_vlm(parse_model(job["model"], job["allow_download"]), job["checkpoint"], job["dtype"])
    inputs, _ = bench_inputs(loaded, job["data"], job["batch_size"])
    patch = apply(loaded.model, job["method"], **job["options"]) if job["method"] else None
    peak = peak_memory_mib(lambda: _run(loaded.model, inputs, job["new_tokens"]), torch.device("cpu"))
    if patch is not None:
        patch.remove()
    print(json.dumps({"peak_memory_mib": peak}))


def bench_inputs(loaded: Any, data: str | None, batch_size: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Model inputs for ``batch_size`` prompts: the first question of a VQA JSONL (``data``), else a seeded
    synthetic image with a fixed question."""
    from PIL import Image

    if data:
        from tokenprune.measure.layouts import load_vqa_jsonl

        row = load_vqa_jsonl(data, 1)[0]
    else:
        pixels = torch.randint(0, 256, (224, 224, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        question = "what color is the shape?" if loaded.extra["prompt"] == "easyvqa" else "Describe the image."
        row = {"index": 0, "question": question, "pil": [Image.fromarray(pixels.numpy())]}
    row["prompt"] = prompt_text(loaded.processor, row["question"], loaded.extra["prompt"])
    rows = [row] * batch_size
    return to_model(loaded.model, encode(loaded.processor, rows)), rows


def _run(model, inputs: dict[str, Any], new_tokens: int) -> tuple[float, float]:
    clock = TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock
        )  # fmt: skip
    first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt
    return first - start, (new_tokens - 1) / (last - first) if new_tokens > 1 and last > first else float("nan")


def _prefill_cache_bytes(model, inputs: dict[str, Any]) -> int:
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
    return kv_cache_bytes(prefill_cache(out))


def prefill_cache(out: Any) -> Any:
    """The cache of a forward's output (transformers 5 names it ``cache``; ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def compare_generation(
    model,
    inputs: dict[str, Any],
    method: str,
    options: dict[str, Any],
    new_tokens: int = 32,
    rounds: int = 3,
    peak: Any = None,
) -> dict[str, Any]:
    """Time to first token, decode tokens/s, KV-cache bytes and peak memory, unpatched vs patched.

    Args:
        peak: ``kind -> MiB`` ("unpatched"/"patched"), e.g. a fresh process per kind on CPU; None: measured in this
            process on CUDA, not measured on CPU.
    """
    device = next(model.parameters()).device
    kinds = ("unpatched", "patched")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    measured: dict[str, dict[str, Any]] = {}

    def under(kind: str, fn: Any) -> Any:
        patch = apply(model, method, **options) if kind == "patched" else None
        try:
            return fn()
        finally:
            if patch is not None:
                patch.remove()

    _run(model, inputs, min(2, new_tokens))  # warm-up
    for kind in kinds:
        if peak is not None:
            memory = peak(kind)
        elif device.type == "cuda":
            memory = under(kind, lambda: peak_memory_mib(lambda: _run(model, inputs, new_tokens), device))
        else:
            memory = None  # this process's allocator holds earlier runs' memory: pass ``peak`` (a fresh process)
        measured[kind] = {"kv_cache_bytes": under(kind, lambda: _prefill_cache_bytes(model, inputs)),
                          "peak_memory_mib": memory}  # fmt: skip
    for _ in range(rounds):
        for kind in kinds:
            times[kind].append(under(kind, lambda: _run(model, inputs, new_tokens)))
    result: dict[str, Any] = {
        "new_tokens": new_tokens,
        "rounds": rounds,
        "batch_size": int(inputs["input_ids"].shape[0]),
    }
    for kind in kinds:
        result[f"ttft_ms_{kind}"] = 1000 * statistics.median(t for t, _ in times[kind])
        result[f"decode_tokens_per_s_{kind}"] = statistics.median(r for _, r in times[kind])
        result[f"kv_cache_bytes_{kind}"] = measured[kind]["kv_cache_bytes"]
        result[f"peak_memory_mib_{kind}"] = measured[kind]["peak_memory_mib"]
        result[f"seconds_{kind}"] = [list(t) for t in times[kind]]
    result["ttft_speedup"] = result["ttft_ms_unpatched"] / result["ttft_ms_patched"]
    result["decode_speedup"] = result["decode_tokens_per_s_patched"] / result["decode_tokens_per_s_unpatched"]
    result["kv_cache_ratio"] = result["kv_cache_bytes_patched"] / result["kv_cache_bytes_unpatched"]
    return result


def generation_table(result: dict[str, Any]) -> str:
    """Unpatched and patched rows side by side, then the ratio."""

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = [
        "| run | time to first token (ms) | decode tokens/s | KV cache after prefill (MiB) | peak memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for kind in ("unpatched", "patched"):
        lines.append(
            f"| {kind} | {result[f'ttft_ms_{kind}']:.1f} | {result[f'decode_tokens_per_s_{kind}']:.1f} | "
            f"{result[f'kv_cache_bytes_{kind}'] / 2**20:.3f} | {mib(result[f'peak_memory_mib_{kind}'])} |"
        )
    lines.append(
        f"| patched / unpatched | {1 / result['ttft_speedup']:.3f} | {result['decode_speedup']:.3f} | "
        f"{result['kv_cache_ratio']:.3f} | |"
    )
    return "\n".join(lines) + "\n"


def bench_generation_command(args: argparse.Namespace) -> dict[str, Any]:
    """``tokenprune bench`` for a vision-language model: :func:`compare_generation` as JSON + table."""
    from tokenprune.measure.models import load_vlm, parse_model
    from tokenprune.measure.options import emit, method_options, setting_label
    from tokenprune.methods.variants import resolve

    loaded = load_vlm(parse_model(args.model, args.allow_download), args.checkpoint, args.dtype)
    if torch.cuda.is_available():
        loaded.model.cuda()
    method, variant = resolve(args.method, "vlm")
    options = {**variant.options, **method_options(args)}
    inputs, _ = bench_inputs(loaded, args.data, args.batch_size or 1)
    peak = None
    if loaded.model.device.type == "cpu" and Path("/proc/self/clear_refs").exists():
        job = {"model": args.model, "allow_download": args.allow_download, "checkpoint": args.checkpoint,
               "dtype": args.dtype, "data": args.data, "batch_size": args.batch_size or 1,
               "new_tokens": args.new_tokens, "options": options}  # fmt: skip

        def peak(kind: str) -> float | None:
            return peak_memory_fresh_process({**job, "method": method if kind == "patched" else None})

    result = compare_generation(loaded.model, inputs, method, options, args.new_tokens, args.rounds, peak)
    result.update({"model": args.model, "method": args.method, "options": options, "device": str(loaded.model.device)})
    result["threads"] = torch.get_num_threads()
    table = f"{args.model}: {setting_label(args.method, options)}, batch {result['batch_size']}, "
    table += f"{args.new_tokens} new tokens, {result['device']}\n\n" + generation_table(result)
    emit(result, args, table)
    return result


if __name__ == "__main__":  # the fresh process of peak_memory_fresh_process
    import json
    import sys

    _fresh_process_peak(json.loads(sys.argv[1]))

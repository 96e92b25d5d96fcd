"""Benchmark: LazyLLM's time to first token on a long prompt, patched vs unpatched, side by side.

A random-weight ``Qwen2ForCausalLM`` of Qwen2-0.5B's shape (its published config.json: hidden 896, 24 layers, 14
query / 2 key-value heads, MLP 4864, vocab 151,936, tied embeddings; 494M parameters), SDPA attention, float32, one
prompt of ``--length`` random token ids (default 8192), this machine's CPU threads (or ``--device cuda``).

Rows: unpatched; ``lazyllm`` at its defaults (prune after layers 5, 11 and 17 of 24, keeping 70% each time) and
at ``keep=0.5``. Random weights: which tokens are kept says nothing of accuracy, only the cost is measured.

* Time to first token: ``generate(max_new_tokens=1)`` (one prefill with the cache, logits of the last position,
  greedy pick), rows interleaved round by round so machine noise hits them alike; medians over rounds; speedup =
  unpatched median / patched median (wall clock; the process CPU time is reported beside it, less sensitive to
  other load on a shared machine). A warm-up on a 256-token prompt runs first and is not counted.
* KV-cache bytes after the prefill (keys + values of every layer), and the aux cache's bytes (hidden states and
  cos/sin of the pruned tokens, kept for revival).
* Analytic LLM prefill FLOPs (2 x MAC, the per-layer table of ``adapter.flops_for``, LM head excluded); the FLOPs
  ratio = unpatched / patched. Goal: speedup >= 0.8 x the FLOPs ratio.

``--vlm``: the same rows on a vision-language model, ``eval/bench_vlm_prefill.py``'s random-weight LLaVA (the same
Qwen2-0.5B-shaped language model, a ViT-S/14-sized CLIP tower at 336 px: 576 visual tokens), one prompt of
``--length`` tokens: 24 text tokens, the image, then text (a long document and question); lazyllm prunes visual
and text tokens alike. The vision tower is in the time (as in ``generate()``), not in the FLOPs ratio (LLM
prefill only). Writes eval/results/lazyllm_ttft_vlm.json.

Writes eval/results/lazyllm_ttft.json (``runs``: one entry per prompt length run, later runs added beside).
Run: python eval/bench_lazyllm_ttft.py [--length 8192] [--rounds 3] [--vlm]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers as hf

import tokenprune
from tokenprune import registry

RESULTS = Path(__file__).parent / "results"
QWEN2_05B = {  # Qwen/Qwen2-0.5B config.json
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
ROWS: dict[str, dict[str, Any] | None] = {
    "unpatched": None,
    "lazyllm (defaults: layers 5/11/17, keep 0.7)": {},
    "lazyllm keep=0.5": {"keep": 0.5},
}


def build(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.Qwen2Config(**QWEN2_05B)
    config._attn_implementation = "sdpa"
    return hf.Qwen2ForCausalLM(config).eval().to(device)


def cache_bytes(cache: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def build_vlm(device: str, length: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``bench_vlm_prefill.py``'s LLaVA, one ``length``-token prompt with one image, and a short warm-up prompt."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_vlm_prefill as vlm  # noqa: PLC0415  (an eval script beside this one, not a package)

    if length < vlm.VISUAL_TOKENS + 32:
        raise SystemExit(f"--vlm needs --length >= {vlm.VISUAL_TOKENS + 32} (the image alone is {vlm.VISUAL_TOKENS})")
    model = vlm.build_model().to(device)
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(1000, 100000, (length - vlm.VISUAL_TOKENS,), generator=generator).tolist()
    ids = torch.tensor([words[:24] + [vlm.IMAGE_TOKEN_ID] * vlm.VISUAL_TOKENS + words[24:]], device=device)
    pixels = torch.randn(1, 3, 336, 336, generator=generator).to(device)
    short = ids[:, : 24 + vlm.VISUAL_TOKENS + 8]
    return model, {"input_ids": ids, "pixel_values": pixels}, {"input_ids": short, "pixel_values": pixels}


def aux_bytes(aux: Any) -> int:
    entries = [e for e in (aux.aux if aux is not None else []) if e is not None]
    return sum(t.nbytes for e in entries for t in e.astuple())


def ttft(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float, Any]:
    """Wall and process-CPU seconds of ``generate(max_new_tokens=1)`` on ``inputs``, and its output."""
    cuda = inputs["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per row (after one warm-up round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vlm", action="store_true", help="on a LLaVA with one image in the prompt (see above)")
    parser.add_argument("--out", type=Path, help="default: eval/results/lazyllm_ttft.json (--vlm: _vlm.json)")
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("lazyllm_ttft_vlm.json" if args.vlm else "lazyllm_ttft.json")

    if args.vlm:
        model, inputs, warm = build_vlm(args.device, args.length)
    else:
        model = build(args.device)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1, QWEN2_05B["vocab_size"], (1, args.length), generator=generator).to(args.device)
        inputs, warm = {"input_ids": ids}, {"input_ids": ids[:, :256]}
    adapter = registry.find_adapter(model)(model)
    depth = adapter.llm_flops.depth
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    cpu_times: dict[str, list[float]] = {name: [] for name in ROWS}
    facts: dict[str, dict[str, Any]] = {}
    with torch.inference_mode():
        for options in ROWS.values():  # warm-up on a short prompt: kernels and allocator, not a result
            patch = None if options is None else tokenprune.apply(model, "lazyllm", **options)
            ttft(model, warm)
            if patch is not None:
                patch.remove()
        for round_ in range(args.rounds):
            for name, options in ROWS.items():
                patch = None if options is None else tokenprune.apply(model, "lazyllm", **options)
                seconds, cpu, out = ttft(model, inputs)
                times[name].append(seconds)
                cpu_times[name].append(cpu)
                if name not in facts:
                    row: dict[str, Any] = {"kv_cache_bytes": cache_bytes(out.past_key_values)}
                    if patch is None:  # the per-layer table with nothing removed
                        row["prefill_flops"] = adapter.llm_flops.prefill(args.length, [0] * depth, 0)
                    else:
                        table = patch.adapter.flops_for(patch.state)
                        row["prefill_flops"] = sum(r["flops"] for r in table["layers"])
                        row["tokens_per_layer"] = [r["tokens_in"] for r in table["layers"]]
                        if args.vlm:
                            row["visual_tokens_per_layer"] = [v[0] for v in patch.state.visual_per_layer()]
                        aux = getattr(patch.adapter.reducer, "aux", {}).get(out.past_key_values)
                        row["aux_cache_bytes"] = aux_bytes(aux)
                        row["options"] = options
                    facts[name] = row
                del out
                if patch is not None:
                    patch.remove()
                print(f"round {round_} {name}: {seconds:.2f} s wall, {cpu:.2f} s CPU", flush=True)

    base = statistics.median(times["unpatched"])
    rows = {}
    for name in ROWS:
        median = statistics.median(times[name])
        cpu = statistics.median(cpu_times[name])
        row = {
            **facts[name],
            "ttft_seconds": times[name],
            "ttft_median_seconds": median,
            "cpu_seconds": cpu_times[name],
            "cpu_median_seconds": cpu,
        }
        if name != "unpatched":
            flops_ratio = facts["unpatched"]["prefill_flops"] / row["prefill_flops"]
            speedup = base / median
            row.update(
                speedup=speedup,
                cpu_speedup=statistics.median(cpu_times["unpatched"]) / cpu,
                flops_ratio=flops_ratio,
                goal_speedup=0.8 * flops_ratio,
                goal_met=speedup >= 0.8 * flops_ratio,
                kv_cache_fraction=row["kv_cache_bytes"] / facts["unpatched"]["kv_cache_bytes"],
            )
        rows[name] = row
    vlm = "random-weight LlavaForConditionalGeneration (eval/bench_vlm_prefill.py's), one image of 576 tokens"
    result = {
        "model": vlm if args.vlm else "random-weight Qwen2ForCausalLM, Qwen2-0.5B shape",
        "config": QWEN2_05B,
        "prompt_tokens": args.length,
        "rounds": args.rounds,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": hf.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": f"python eval/bench_lazyllm_ttft.py --length {args.length} --rounds {args.rounds}"
        + (" --vlm" if args.vlm else ""),
        "rows": rows,
    }
    # One file, one entry per prompt length (a run at another length is added beside the earlier ones).
    runs = {}
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        runs = previous.get("runs", {str(previous.get("prompt_tokens")): previous})
    runs[str(args.length)] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": dict(sorted(runs.items(), key=lambda kv: int(kv[0])))}, indent=2) + "\n")
    for name, row in rows.items():
        extra = "" if name == "unpatched" else f"  speedup {row['speedup']:.2f} (FLOPs ratio {row['flops_ratio']:.2f})"
        print(f"{name}: TTFT {row['ttft_median_seconds']:.2f} s, KV {row['kv_cache_bytes'] / 2**20:.1f} MiB{extra}")


if __name__ == "__main__":
    main()

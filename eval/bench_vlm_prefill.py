"""Benchmark: prefill latency, FLOPs and peak memory of a LLaVA-architecture VLM, patched vs unpatched.

Issue "AIM and FastV on Hugging Face multimodal LLMs": a random-weight ``LlavaForConditionalGeneration`` with a
Qwen2-0.5B-shaped language model (24 layers, width 896, 14 query / 2 key-value heads, MLP 4864, vocab 151,936,
tied embeddings: 494M parameters) and a ViT-S/14-sized CLIP vision tower at 336 px (576 visual tokens per
image), batch 2 (two different questions, left padding), SDPA attention, float32, this machine's CPU threads.

Rows: unpatched; ``aim`` at AIM's ~7x fewer LLM prefill FLOPs (``flops=0.14``: merge before the LLM solved for
the budget, then progressive pruning from 50% to 75% of the layers); ``fastv`` at K=2, keep 0.25; every method
acting before the LLM at 64 of the 576 tokens (``tokens=64``), the tower's own signals and the method's own work
included in its time; ``tome`` inside the vision tower, merging evenly in the layers before LLaVA's feature
layer down to 64 tokens per image; the in-LLM methods ``pyramiddrop`` (lambda 0.5), ``dart`` (64 of 576 kept after
layer 2) and ``sparsevlm`` (its released 64-token schedule).

* Latency: one prefill as ``generate()`` runs it (``use_cache=True``, logits of the last position only), the
  rows interleaved round by round so machine noise hits them alike; medians over rounds; speedup = ratio of
  medians. The time inside the language model (hooks on it) is reported too.
* FLOPs (2 x MAC) per sample, measured by ``torch.utils.flop_counter`` on sample 0 alone, and the analytic LLM
  prefill FLOPs (the sum of the per-layer table: what ``flops=`` is a fraction of).
* Peak memory: each row in a fresh subprocess: resident memory high-water mark during one batch-2 prefill above
  the resident memory before it (Linux ``/proc/self/clear_refs`` resets the mark), i.e. activations + cache.

Writes eval/results/bench_vlm_prefill_cpu.{json,md}. Run: python eval/bench_vlm_prefill.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers as hf
from tqdm.auto import tqdm

import tokenprune
from tokenprune.measure.bench import ModuleTimer, call

RESULTS = Path(__file__).parent / "results"
IMAGE_TOKEN_ID = 151655  # a Qwen2-vocabulary id, as Qwen-based LLaVA models use
PAD_ID = 151643
VISUAL_TOKENS = 576  # (336 / 14)^2
PRE_LLM_TOKENS = 64  # of 576: the literature's smallest LLaVA-1.5 setting
# --smoke: the same script on a model ~1000x smaller (a quick check that everything runs; not a result).
SMOKE = "--smoke" in sys.argv
TOWER_LAYERS, FEATURE_LAYER = (2 if SMOKE else 12), -2  # LLaVA reads the penultimate tower layer's output
# ToMe inside the tower: merges spread evenly over the layers before the feature layer, down to 64 per image
# (at most half the patches per layer: the smoke model's one layer merges half).
_BEFORE = TOWER_LAYERS + FEATURE_LAYER + 1
_MERGES, _EXTRA = divmod(min(VISUAL_TOKENS - PRE_LLM_TOKENS, _BEFORE * VISUAL_TOKENS // 2), _BEFORE)
TOWER_R = [_MERGES + (layer < _EXTRA) for layer in range(_BEFORE)] + [0] * -(FEATURE_LAYER + 1)
ROWS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "unpatched": None,
    "aim flops=0.14": ("aim", {"flops": 0.14}),
    "fastv k=2 keep=0.25": ("fastv", {"k": 2, "keep": 0.25}),
    **{
        f"{method} tokens={PRE_LLM_TOKENS}": (method, {"tokens": PRE_LLM_TOKENS})
        for method in ("visionzip", "vispruner", "divprune", "cdpruner", "random_pre_llm")
    },
    f"tome in the tower, {PRE_LLM_TOKENS} left": ("tome", {"r": TOWER_R}),
    # In-LLM methods of issue 17 at their papers' settings for 64 of 576 tokens (or their default, pyramiddrop).
    "pyramiddrop keep=0.5": ("pyramiddrop", {"keep": 0.5}),
    f"dart k=2 keep={PRE_LLM_TOKENS}/{VISUAL_TOKENS}": ("dart", {"k": 2, "keep": PRE_LLM_TOKENS / VISUAL_TOKENS}),
    "sparsevlm retain=64": ("sparsevlm", {"retain": 64}),
}
GOAL_AIM_SPEEDUP = 3.0
GOAL_PRE_LLM = 0.8  # pre-LLM methods: speedup >= 0.8 x (unreduced / reduced total FLOPs), their overhead included


def build_model() -> hf.LlavaForConditionalGeneration:
    """The random-weight LLaVA (fixed seed); see the module docstring for the shapes."""
    torch.manual_seed(0)
    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6)
    text = dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936,
    )  # fmt: skip
    if SMOKE:
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        text.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    vision = hf.CLIPVisionConfig(**vision, image_size=336, patch_size=14)
    text = hf.Qwen2Config(**text, max_position_embeddings=4096, tie_word_embeddings=True)
    config = hf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=PAD_ID,
    )  # fmt: skip
    model = hf.LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def build_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    """Two chat-style prompts: system text, the image, a short question (different lengths), left padded."""
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> list[int]:
        return torch.randint(1000, 100000, (n,), generator=generator).tolist()

    system = words(24)
    prompts = [system + [IMAGE_TOKEN_ID] * VISUAL_TOKENS + words(n) for n in (14, 20, 11, 17)[:batch]]
    width = max(map(len, prompts))
    ids = torch.full((batch, width), PAD_ID)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    pixels = torch.randn(batch, 3, 336, 336, generator=generator)
    # logits_to_keep=1: prefill as generate() runs it (the LM head only on the last position).
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "use_cache": True, "logits_to_keep": 1}


def sample(inputs: dict[str, Any], index: int) -> dict[str, Any]:
    """One sample of the batch without its padding."""
    keep = inputs["attention_mask"][index].bool()
    return {
        "input_ids": inputs["input_ids"][index][keep][None],
        "pixel_values": inputs["pixel_values"][index : index + 1],
        "use_cache": True,
        "logits_to_keep": 1,
    }


def apply_row(model: torch.nn.Module, row: str) -> Any:
    spec = ROWS[row]
    return None if spec is None else tokenprune.apply(model, spec[0], **spec[1])


def flops_row(model: torch.nn.Module, row: str, inputs: dict[str, Any]) -> dict[str, float]:
    """Measured total FLOPs and analytic LLM prefill FLOPs of sample 0, for this row's patch."""
    one = sample(inputs, 0)
    patch = apply_row(model, row)
    if patch is None:  # the adapter's analytic table of the unreduced model
        patch = tokenprune.apply(model, "fastv", keep=1.0)
    with torch.no_grad():
        report = tokenprune.count_flops(model, one)
    patch.remove()
    llm = sum(layer["flops"] for layer in report.layers)
    return {"gflops_total": report.measured / 1e9, "gflops_llm_prefill": llm / 1e9}


def peak_memory_child(row: str) -> None:
    """Subprocess body: prints the resident-memory rise (MiB) of one batch-2 prefill under ``row``."""

    def status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    model, inputs = build_model(), build_inputs()
    apply_row(model, row)
    with torch.inference_mode():
        call(model, inputs)  # warm-up: lazy allocations and kernel caches are not the prefill's
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
        call(model, inputs)
    print(json.dumps({"peak_mib_above_weights": status("VmHWM") - before}))


def peak_memory(row: str) -> float:
    completed = subprocess.run(
        [sys.executable, __file__, "--memory-child", row, *(["--smoke"] if SMOKE else [])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])["peak_mib_above_weights"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory subprocesses")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny model, results not written: checks the script")
    args = parser.parse_args()
    if args.memory_child:
        return peak_memory_child(args.memory_child)

    model, inputs = build_model(), build_inputs()
    results: dict[str, dict[str, Any]] = {row: {"row": row} for row in ROWS}
    for row in ROWS:
        results[row]["method"], results[row]["options"] = ROWS[row] or ("none", {})
        results[row].update(flops_row(model, row, inputs))

    # Before any patch: AIM's merging, in the patch's pre-hook on the language model, is timed as LLM work.
    timer = ModuleTimer(model.model.language_model)
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    llm_times: dict[str, list[float]] = {row: [] for row in ROWS}
    with torch.inference_mode():
        for step in tqdm(range(1 + args.rounds), desc="prefill rounds (first: warm-up)"):
            for row in ROWS:
                patch = apply_row(model, row)
                start = time.perf_counter()
                call(model, inputs)
                elapsed = time.perf_counter() - start
                if patch is not None:
                    tokens = [n for n, _ in patch.state.tokens_per_layer()]
                    results[row]["llm_tokens_per_layer_sample0"] = tokens
                    patch.remove()
                if step:
                    times[row].append(elapsed)
                    llm_times[row].append(timer.seconds)
    timer.remove()

    base = results["unpatched"]
    for row in ROWS:
        median = statistics.median(times[row])
        results[row].update(
            {
                "prefill_seconds": times[row],
                "prefill_median_s": median,
                "llm_median_s": statistics.median(llm_times[row]),
                "speedup": statistics.median(times["unpatched"]) / median,
                "llm_speedup": statistics.median(llm_times["unpatched"]) / statistics.median(llm_times[row]),
                "llm_flops_ratio": results[row]["gflops_llm_prefill"] / base["gflops_llm_prefill"],
                "total_flops_ratio": results[row]["gflops_total"] / base["gflops_total"],
            }
        )
    if not args.no_memory:
        for row in tqdm(ROWS, desc="peak memory (one subprocess per row)"):
            results[row]["peak_mib_above_weights"] = peak_memory(row)
    for row, spec in ROWS.items():  # every reducing row: speedup >= 0.8 x the total FLOPs ratio (aim: also 3x)
        if spec is not None:
            result = results[row]
            result["speedup_goal"] = GOAL_PRE_LLM / result["total_flops_ratio"]
            result["speedup_goal_met"] = result["speedup"] >= result["speedup_goal"]
            if "peak_mib_above_weights" in result:
                result["memory_goal_met"] = result["peak_mib_above_weights"] <= base["peak_mib_above_weights"]

    meta = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": hf.__version__,
        "batch_size": int(inputs["input_ids"].shape[0]),
        "prompt_lengths": inputs["attention_mask"].sum(-1).tolist(),
        "visual_tokens_per_image": VISUAL_TOKENS,
        "parameters": sum(p.numel() for p in model.parameters()),
        "rounds": args.rounds,
        "goal": f"aim speedup >= {GOAL_AIM_SPEEDUP}x (AIM's own code: 1.0x, it only masks); methods acting before "
        f"the LLM (and tower ToMe) at {PRE_LLM_TOKENS} tokens, and every other reducing row: "
        f"speedup >= {GOAL_PRE_LLM} x the total FLOPs ratio, "
        "peak memory not above the unpatched model's",
    }
    rows = list(results.values())
    if args.smoke:
        return print(json.dumps(rows, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_vlm_prefill_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"LLaVA (Qwen2-0.5B-shaped LM, {meta['parameters'] / 1e6:.0f}M parameters, random weights), batch "
        f"{meta['batch_size']}, prompts {meta['prompt_lengths']} tokens ({VISUAL_TOKENS} visual each), "
        f"{meta['threads']} CPU threads, medians of {args.rounds} interleaved rounds. FLOPs per sample (2 x MAC).",
        "",
        "| setting | LLM prefill GFLOPs | LLM FLOPs ratio | total GFLOPs | total FLOPs ratio | prefill s | speedup "
        "| goal (0.8 x FLOPs) | LLM s | LLM speedup | peak MiB above weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = row.get("peak_mib_above_weights")
        goal = ""
        if "speedup_goal" in row:
            goal = f"{row['speedup_goal']:.2f}x {'met' if row['speedup_goal_met'] else 'MISSED'}"
            if "memory_goal_met" in row:
                goal += f", memory {'met' if row['memory_goal_met'] else 'MISSED'}"
        lines.append(
            f"| {row['row']} | {row['gflops_llm_prefill']:.1f} | {row['llm_flops_ratio']:.3f} "
            f"({1 / row['llm_flops_ratio']:.1f}x fewer) | {row['gflops_total']:.1f} | {row['total_flops_ratio']:.3f} "
            f"| {row['prefill_median_s']:.2f} | {row['speedup']:.2f}x | {goal} | {row['llm_median_s']:.2f} "
            f"| {row['llm_speedup']:.2f}x | {'' if memory is None else f'{memory:.0f}'} |"
        )
    (RESULTS / "bench_vlm_prefill_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

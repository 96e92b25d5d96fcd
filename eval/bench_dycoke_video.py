"""Benchmark: DyCoke on a video prompt: prefill (stage 1) and decode steps (stage 2), patched vs unpatched.

A random-weight ``Qwen2VLForConditionalGeneration`` with a Qwen2-0.5B-shaped language model (hidden 896, 24 layers,
14 query / 2 key-value heads, MLP 4864, vocab 151,936, tied embeddings) and a ViT-S-sized vision tower (12 blocks
of width 384, patch 14, 2 x 2 spatial merge, temporal patch 2), SDPA attention, float32, this machine's CPU threads.
One prompt: text, a video of ``--slices`` temporal slices (``2 x --slices`` frames) of ``--side`` x ``--side``
patches (``side^2 / 4`` tokens per slice), a question. Random weights: which tokens are kept says nothing of
accuracy, only the cost is measured.

Rows: unpatched; ``dycoke`` stage 1 only (``kv_ratio=0``: the reference's ``dycoke_k=0.7``, windows of 4 slices);
``dycoke`` at its defaults (stage 1, and stage 2 with the reference's ``dycoke_l=3``, ``dycoke_p=0.7``).

* Prefill: ``generate(max_new_tokens=1)`` (vision tower, one LLM prefill, greedy pick); decode: the extra time of
  ``generate(max_new_tokens=1 + --decode)`` per decoded token. Rows interleaved round by round; medians.
* LLM prefill FLOPs (2 x MAC, the adapter's per-layer table); goal (issue 17): prefill speedup >= 0.8 x the LLM
  prefill FLOPs ratio. Stage 2 changes no prefill FLOPs: its row shows what masking 70% of the video's cache
  entries at every decode step buys (and costs: one attention row at the ranking layer, one mask per step).

Writes eval/results/bench_dycoke_video_cpu.json. Run: python eval/bench_dycoke_video.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers as hf
from tqdm.auto import tqdm

import tokenprune

RESULTS = Path(__file__).parent / "results"
IMAGE, VIDEO, START, END, PAD, EOS = 151655, 151656, 151652, 151653, 151643, 151645
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
ROWS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "unpatched": None,
    "dycoke stage 1 (kv_ratio=0)": ("dycoke", {"kv_ratio": 0.0}),
    "dycoke stages 1 + 2 (defaults)": ("dycoke", {}),
}
GOAL = 0.8
SECTIONS = {False: [8, 12, 12], True: [2, 3, 3]}  # M-RoPE (t, h, w) sections: half of head_dim 64 and 16


def build_model(smoke: bool) -> hf.Qwen2VLForConditionalGeneration:
    """The random-weight Qwen2-VL (fixed seed); see the module docstring for the shapes."""
    torch.manual_seed(0)
    width = 64 if smoke else 896
    vision = dict(
        depth=2 if smoke else 12, embed_dim=32 if smoke else 384, num_heads=2 if smoke else 6, mlp_ratio=4,
        hidden_size=width, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    text = dict(
        hidden_size=width, intermediate_size=128 if smoke else 4864, num_hidden_layers=4 if smoke else 24,
        num_attention_heads=4 if smoke else 14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": SECTIONS[smoke]},
    )  # fmt: skip
    config = hf.Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=START, vision_end_token_id=END, pad_token_id=PAD, bos_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    model = hf.Qwen2VLForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def build_inputs(slices: int, side: int) -> dict[str, torch.Tensor]:
    """System text, the video (``slices`` x ``side^2 / 4`` placeholders), a question; one prompt."""
    generator = torch.Generator().manual_seed(0)

    def words(n: int) -> list[int]:
        return torch.randint(1000, 100000, (n,), generator=generator).tolist()

    grid = (slices, side, side)
    ids = words(24) + [START] + [VIDEO] * (slices * side * side // 4) + [END] + words(16)
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": 2 * (input_ids == VIDEO).int(),  # text 0, video 2
        "pixel_values_videos": torch.randn(slices * side * side, PATCH_DIM, generator=generator),
        "video_grid_thw": torch.tensor([grid]),
    }


def generate_seconds(model: torch.nn.Module, inputs: dict[str, Any], tokens: int) -> float:
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=8, help="temporal slices (2 frames each)")
    parser.add_argument("--side", type=int, default=20, help="patches per side of a frame (tokens: side^2 / 4)")
    parser.add_argument("--decode", type=int, default=16, help="decoded tokens timed after the first")
    parser.add_argument("--smoke", action="store_true", help="tiny model, results not written: checks the script")
    args = parser.parse_args()
    model, inputs = build_model(args.smoke), build_inputs(args.slices, args.side)

    results: dict[str, dict[str, Any]] = {}
    for row, spec in ROWS.items():
        method, options = spec or ("dycoke", {"ratio": 0.0, "kv_ratio": 0.0})  # the unreduced per-layer table
        patch = tokenprune.apply(model, method, **options)
        with torch.no_grad():
            model(**inputs)
            flops = patch.adapter.flops_for(patch.state)
            visual = patch.state.visual_per_layer()[0][0]
        patch.remove()
        llm = sum(layer["flops"] for layer in flops["layers"])
        results[row] = {"row": row, "method": method, "options": options, "gflops_llm_prefill": llm / 1e9}
        results[row]["visual_tokens_entering_llm"] = visual

    prefill: dict[str, list[float]] = {row: [] for row in ROWS}
    decode: dict[str, list[float]] = {row: [] for row in ROWS}
    with torch.inference_mode():
        for step in tqdm(range(1 + args.rounds), desc="rounds (first: warm-up)"):
            for row, spec in ROWS.items():
                patch = None if spec is None else tokenprune.apply(model, spec[0], **spec[1])
                first = generate_seconds(model, inputs, 1)
                more = generate_seconds(model, inputs, 1 + args.decode)
                if patch is not None:
                    patch.remove()
                if step:
                    prefill[row].append(first)
                    decode[row].append((more - first) / args.decode)

    base = results["unpatched"]
    for row in ROWS:
        result = results[row]
        result |= {
            "prefill_seconds": prefill[row],
            "decode_seconds_per_token": decode[row],
            "prefill_median_s": statistics.median(prefill[row]),
            "decode_median_s": statistics.median(decode[row]),
            "llm_flops_ratio": result["gflops_llm_prefill"] / base["gflops_llm_prefill"],
        }
        result["prefill_speedup"] = base["prefill_median_s"] / result["prefill_median_s"]
        result["decode_speedup"] = base["decode_median_s"] / result["decode_median_s"]
        if ROWS[row] is not None:
            result["prefill_goal"] = GOAL / result["llm_flops_ratio"]
            result["prefill_goal_met"] = result["prefill_speedup"] >= result["prefill_goal"]
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": hf.__version__,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "video": {"slices": args.slices, "frames": 2 * args.slices, "tokens_per_slice": args.side**2 // 4},
        "parameters": sum(p.numel() for p in model.parameters()),
        "rounds": args.rounds,
        "decode_tokens": args.decode,
        "goal": f"prefill speedup >= {GOAL} x the LLM prefill FLOPs ratio",
    }
    lines = [
        f"Qwen2-VL (Qwen2-0.5B-shaped LM, {meta['parameters'] / 1e6:.0f}M parameters, random weights), one prompt of "
        f"{meta['prompt_tokens']} tokens ({2 * args.slices} frames, {args.slices} x {args.side**2 // 4} video tokens), "
        f"{meta['threads']} CPU threads, medians of {args.rounds} interleaved rounds.",
        "",
        "| setting | video tokens in the LLM | LLM prefill GFLOPs | FLOPs ratio | prefill s | speedup | goal (0.8 x) "
        "| decode s/token | decode speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        goal = f"{r['prefill_goal']:.2f}x {'met' if r['prefill_goal_met'] else 'MISSED'}" if "prefill_goal" in r else ""
        lines.append(
            f"| {r['row']} | {r['visual_tokens_entering_llm']} | {r['gflops_llm_prefill']:.1f} "
            f"| {r['llm_flops_ratio']:.3f} | {r['prefill_median_s']:.2f} | {r['prefill_speedup']:.2f}x | {goal} "
            f"| {r['decode_median_s']:.3f} | {r['decode_speedup']:.2f}x |"
        )
    print("\n".join(lines))
    if args.smoke:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": list(results.values()), "table": lines}
    (RESULTS / "bench_dycoke_video_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()

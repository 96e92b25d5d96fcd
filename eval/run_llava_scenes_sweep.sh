#!/usr/bin/env bash
# The LLaVA-576 yardstick: every VLM method at 192 / 128 / 64 of llava-scenes' 576 visual tokens per image (the
# literature's LLaVA-1.5 table), on a seeded subset of the scenes test split (2,000 scenes from fixed seeds).
#   bash eval/run_llava_scenes_sweep.sh      (CPU, 1 thread)
# Methods with a tokens= option keep exactly N per image; tome runs inside the vision tower, merging evenly
# down to N; methods that prune inside the LLM get the LLM prefill FLOPs of N tokens, spent their own way.
# Writes eval/results/llava_scenes/: one JSON per setting, sweep.json, table.md, pareto.png, then families.md
# (accuracy per question family, family average, % of unreduced: eval/llava_scenes_table.py).
# LIMIT / TOKENS / METHODS / CHECKPOINT override the defaults; reruns keep finished settings (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LIMIT=${LIMIT:-1000}
TOKENS=${TOKENS:-192,128,64}
METHODS=${METHODS:-none,visionzip,vispruner,divprune,cdpruner,tome,random_pre_llm,aim,fastv,random,pyramiddrop,dart,sparsevlm,lazyllm}
CHECKPOINT_ARGS=()
if [[ -n "${CHECKPOINT:-}" ]]; then CHECKPOINT_ARGS=(--checkpoint "$CHECKPOINT"); fi
tokenprune sweep --model llava-scenes "${CHECKPOINT_ARGS[@]}" --methods "$METHODS" --tokens "$TOKENS" \
    --limit "$LIMIT" --batch-size 32 --bench-rounds 1 --out eval/results/llava_scenes --resume
python eval/llava_scenes_table.py eval/results/llava_scenes

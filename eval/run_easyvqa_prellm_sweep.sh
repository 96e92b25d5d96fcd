#!/usr/bin/env bash
# Methods acting before the LLM vs the in-LLM ones (aim, fastv, random, pyramiddrop, dart, sparsevlm, lazyllm) on llava-easyvqa, at 48 / 32 / 16 of its 144 visual
# tokens per image (the fractions of LLaVA-1.5's 192 / 128 / 64 of 576), on a seeded subset of the easy-VQA
# test split.
#   pip install -e '.[zoo,eval,vqa]' && bash eval/run_easyvqa_prellm_sweep.sh    (CPU, 1 thread; ~2 min per setting)
# Methods with a tokens= option keep exactly N per image; tome runs inside the vision tower, merging evenly
# down to N; aim / fastv / random (in the LLM) get the LLM prefill FLOPs of N tokens (see `tokenprune sweep
# --help`). Writes eval/results/easyvqa_prellm/: one JSON per setting, sweep.json, table.md, pareto.png.
# LIMIT / TOKENS / METHODS override the defaults; reruns keep finished settings (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LIMIT=${LIMIT:-500}
TOKENS=${TOKENS:-48,32,16}
METHODS=${METHODS:-none,visionzip,vispruner,divprune,cdpruner,tome,random_pre_llm,aim,fastv,fastv_k1,random,pyramiddrop,dart,sparsevlm,lazyllm}
tokenprune sweep --model llava-easyvqa --methods "$METHODS" --tokens "$TOKENS" --limit "$LIMIT" \
    --batch-size 32 --bench-rounds 1 --out eval/results/easyvqa_prellm --resume

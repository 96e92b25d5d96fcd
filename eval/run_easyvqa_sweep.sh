#!/usr/bin/env bash
# Accuracy vs LLM prefill FLOPs of llava-easyvqa (the shipped checkpoint) on the easy-VQA test split.
#   pip install -e '.[zoo,eval,vqa]' && bash eval/run_easyvqa_sweep.sh      (CPU, 1 thread; ~1 min per setting)
# Writes eval/results/easyvqa_sweep/: one JSON per setting, sweep.json, table.md, pareto.png; then the unpruned
# accuracy on the whole test split (none_full_test.json). LIMIT / BUDGETS / METHODS override the defaults;
# reruns keep finished settings (--resume). fastv/random keep every visual token in layers 0-1 (FastV's K = 2),
# so they cannot reach the lowest budgets; the _k1 variants prune after layer 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LIMIT=${LIMIT:-1000}
BUDGETS=${BUDGETS:-1,0.5,0.35,0.3,0.2,0.14}
METHODS=${METHODS:-none,aim,aim_late,aim_merge,aim_prune,fastv,fastv_k1,random,random_k1}
OUT=eval/results/easyvqa_sweep
tokenprune sweep --model llava-easyvqa --methods "$METHODS" --flops "$BUDGETS" --limit "$LIMIT" \
    --batch-size 32 --bench-rounds 1 --out "$OUT" --resume
if [ ! -f "$OUT/none_full_test.json" ]; then
    tokenprune eval --model llava-easyvqa --method none --batch-size 32 --bench-rounds 1 \
        --out "$OUT/none_full_test.json" > /dev/null
fi

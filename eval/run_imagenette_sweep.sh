#!/usr/bin/env bash
# Reproduces eval/results/imagenette_sweep/: the FLOPs-vs-accuracy sweep of vit-s14-imagenette on the full
# Imagenette val (3,925 images, 224 px), images/s measured side by side per setting. Resumable (--resume).
# Budgets are listed in the order they run (budget-major: every method at a budget before the next budget).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${TOKENPRUNE_DATA:-../shared/datasets}"
tokenprune sweep --model vit-s14-imagenette --methods none,tome,evit,random \
  --flops 1,0.5,0.35,0.65,0.8,0.4 --data "$DATA" --batch-size 32 --bench-rounds 2 \
  --out eval/results/imagenette_sweep --resume "$@"

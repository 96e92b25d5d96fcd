#!/usr/bin/env bash
# Reproduces eval/results/camvid_sweep/ (vit-s14-camvid: dtop early exit vs tome / random at equal GFLOPs).
#
#   1. val:  the unreduced segmenter and dtop at every threshold in $THRESHOLDS (keep_top_k=$KEEP_TOP_K): one
#            number for every exit stage, or a list [after 4 blocks, after 8 blocks] (per-stage thresholds: an
#            exit after 4 blocks saves twice the blocks of one after 8, and its aux head is the weaker).
#   2. pick: on val only, the threshold with the fewest GFLOPs whose val mIoU is at most $MAX_DROP points
#            below the unreduced model's (if none qualifies: the highest threshold); written to selected.json.
#   3. test: the unreduced segmenter, the selected dtop setting, tome and random at the FLOPs ratio that
#            setting measured on test; then the thresholds in $TEST_THRESHOLDS (reported, not chosen from),
#            each with tome and random at its own measured FLOPs ratio.
#
# Usage: eval/run_camvid_sweep.sh            (DATA=<dir containing camvid/>, default ../shared/datasets)
# Each setting's JSON is kept, so a rerun resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/datasets}
OUT=${OUT:-eval/results/camvid_sweep}
THRESHOLDS=${THRESHOLDS:-[0.8,0.9,0.95,0.97,0.98,0.99,0.995,0.998,0.999,[0.99,0.98],[0.995,0.97],[0.99,0.9],[0.98,0.9],[0.98,0.8],[0.97,0.9],[0.995,0.99],[0.998,0.99],[0.999,0.99],[0.999,0.98]]}
KEEP_TOP_K=${KEEP_TOP_K:-5}
TEST_THRESHOLDS=${TEST_THRESHOLDS:-[0.999,0.998,0.995,0.99]}
MAX_DROP=${MAX_DROP:-0.5}
BATCH=${BATCH:-8}
export OMP_NUM_THREADS=${THREADS:-2}

sweep() {
  python -m tokenprune.cli sweep --model vit-s14-camvid --data "$DATA" --batch-size "$BATCH" --resume "$@"
}

sweep --split val --methods none,dtop --set "threshold=$THRESHOLDS" --set "keep_top_k=$KEEP_TOP_K" --out "$OUT/val"

SELECTED=$(python - "$OUT" "$MAX_DROP" <<'EOF'
import json, sys
from pathlib import Path

out, max_drop = Path(sys.argv[1]), float(sys.argv[2])
rows = json.loads((out / "val" / "sweep.json").read_text())
dense = next(r for r in rows if r["method"] == "none")
dtop = [r for r in rows if r["method"] == "dtop" and "error" not in r]
ok = [r for r in dtop if 100 * (dense["miou"] - r["miou"]) <= max_drop]
strictest = lambda r: min(r["config"]["threshold"]) if isinstance(r["config"]["threshold"], list) else r["config"]["threshold"]
pick = min(ok, key=lambda r: r["gflops_per_image"]) if ok else max(dtop, key=strictest)
choice = {
    "rule": f"fewest val GFLOPs with val mIoU drop <= {max_drop} points (else the highest threshold)",
    "threshold": pick["config"]["threshold"],
    "keep_top_k": pick["config"]["keep_top_k"],
    "val_miou": pick["miou"],
    "val_miou_unreduced": dense["miou"],
    "val_gflops_per_image": pick["gflops_per_image"],
    "val_flops_ratio": pick["flops_ratio"],
    "qualified": bool(ok),
}
(out / "selected.json").write_text(json.dumps(choice, indent=2) + "\n")
# A list of one setting: a per-stage pick [a, b] must reach the sweep as [[a, b]], not as two thresholds.
print(json.dumps([choice["threshold"]]).replace(" ", ""))
EOF
)
echo "selected on val: $SELECTED (a list of one threshold setting)"

# The selected setting and its equal-FLOPs baselines first, then every other threshold with its own baselines.
sweep --split test --methods none,dtop,tome,random --set "threshold=$SELECTED" --set "keep_top_k=$KEEP_TOP_K" \
  --flops match --out "$OUT/test"
sweep --split test --methods dtop,tome,random --set "threshold=$TEST_THRESHOLDS" --set "keep_top_k=$KEEP_TOP_K" \
  --flops match --out "$OUT/test"

#!/usr/bin/env bash
# Behaviour check for refactors: the eval CLI's results (accuracy / mIoU, GFLOPs, schedules, per-layer tokens; every
# field but timings) of this tree against an earlier commit, side by side on the same small subsets.
#   bash eval/compare_with_commit.sh 6df74a7      (TOKENPRUNE_DATA or ../shared/datasets; ~10 min on 2 threads)
# Prints SAME or DIFF (with the differing fields) per command.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: compare_with_commit.sh <commit>}
DATA=${TOKENPRUNE_DATA:-$(cd .. && pwd)/shared/datasets}
OLD=$(mktemp -d)/base
git worktree add -q "$OLD" "$BASE"
trap 'git worktree remove --force "$OLD"' EXIT
run() {  # run TREE ARGS...: the eval JSON (written with --out: stdout is a table) without its timing fields
    local tree=$1; shift
    local out; out=$(mktemp --suffix .json)
    (cd "$tree" && PYTHONPATH="$tree" OMP_NUM_THREADS=2 python -m tokenprune.cli eval --bench-rounds 1 "$@" \
        --out "$out" >/dev/null 2>&1)
    python -c "import json, sys; d = json.load(open(sys.argv[1])); skip = ('_per_s', 'ms', 'seconds', 'speedup', 'time')
print(json.dumps({k: v for k, v in d.items() if not any(t in k for t in skip)}, sort_keys=True))" "$out"
    rm -f "$out"
}
while read -r args; do
    a=$(run "$OLD" $args); b=$(run . $args)
    if [ "$a" == "$b" ]; then echo "SAME: $args"; else echo "DIFF: $args"; python - "$a" "$b" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for key in sorted(set(a) | set(b)):
    if a.get(key) != b.get(key):
        print("  ", key, str(a.get(key))[:150], "|", str(b.get(key))[:150])
PY
    fi
done <<EOF2
--model vit-s14-imagenette --method tome --flops 0.5 --data $DATA --limit 40
--model vit-s14-imagenette --method evit --flops 0.4 --data $DATA --limit 40
--model vit-s14-imagenette --method random --flops 0.6 --data $DATA --limit 40
--model vit-s14-camvid --method dtop --set threshold=0.99 --data $DATA --limit 3
--model vit-s14-camvid --method tome --flops 0.7 --data $DATA --limit 3
--model llava-easyvqa --method aim --flops 0.3 --limit 40
--model llava-easyvqa --method fastv --flops 0.5 --limit 40
--model llava-easyvqa --method aim --set merge_keep=0.25 --limit 40
--model llava-easyvqa --method random_visual --flops 0.5 --limit 40
--model llava-easyvqa --method none --limit 40
EOF2

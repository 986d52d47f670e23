#!/usr/bin/env bash
# Fashion-MNIST (full 60k train / 10k test) with a small EMamba vs timm's ResNet-18, same recipe and budget.
# Both use the bundled recipe (configs/bundled_tiny.yaml: 32x32 grayscale input, AdamW, cosine, label
# smoothing 0.1, light crop/flip augmentation) on the full data for the same number of epochs.
# Usage: scripts/fashion_mnist_bench.sh [DATA_DIR] [OUT_DIR]   (results: docs/training.md, "Measurements")
#   env: EPOCHS (default 2), THREADS per run (default 1), PARALLEL=1 to run both at once (default: one after
#   the other), PYTHON (default .venv/bin/python if present, else python3)
set -euo pipefail
DATA=${1:-/work/shared/data/fashion-mnist}
OUT=${2:-outputs/fashion_mnist_bench}
EPOCHS=${EPOCHS:-2}
THREADS=${THREADS:-1}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"
common=(--config configs/bundled_tiny.yaml --dataset fashion_mnist --data-path "$DATA" --epochs "$EPOCHS"
        --threads "$THREADS" --no-progress --seed 0)
run() {  # name model
  echo "+ $PY -m emamba.train ${common[*]} --model $2 --output_dir $OUT/$1" | tee "$OUT/$1.cmd"
  OMP_NUM_THREADS=$THREADS "$PY" -m emamba.train "${common[@]}" --model "$2" --output_dir "$OUT/$1" > "$OUT/$1.log" 2>&1
}
"$PY" -c "import emamba.ops as o, torch; print('scan backends available:', o.available_backends(), '| torch', torch.__version__, '| threads', $THREADS)" | tee "$OUT/env.txt"
if [ "${PARALLEL:-0}" = 1 ]; then
  run emamba_tiny emamba_tiny & run resnet18 resnet18 & wait
else
  run emamba_tiny emamba_tiny
  run resnet18 resnet18
fi
for name in emamba_tiny resnet18; do
  "$PY" - "$OUT/$name/summary.jsonl" "$name" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
secs = sum(r["train_time_s"] for r in rows) / len(rows)
print(f"{sys.argv[2]:<12} epochs {rows[-1]['epoch']}  val top-1 {rows[-1]['val_top1']:.2f}  "
      f"best {max(r['val_top1'] for r in rows):.2f}  train s/epoch {secs:.0f}  eval s {rows[-1]['eval_time_s']:.0f}")
PYEOF
done | tee "$OUT/results.txt"

#!/usr/bin/env bash
# End-to-end GPU checks that follow benchmarks/gpu_check.sh (the scan kernels): needs one CUDA GPU.
#
#   1. `emamba benchmark` of EMamba-S at 224 px in bf16 autocast, train and infer, batch 32, with the scan
#      backends auto (= triton on CUDA), torch (chunked pure PyTorch) and reference (the sequential loop of
#      the original code's pure-PyTorch path): the GPU counterpart of the CPU end-to-end ratios;
#   2. the bundled default training run (`emamba train`, 4 epochs) on CUDA with --amp bf16;
#   3. a one-process torchrun job with --fsdp and --amp fp16: initialises NCCL, shards with FSDP2 and
#      steps the sharded GradScaler on the GPU (one GPU cannot host two NCCL ranks, so this is the most a
#      single-GPU machine can check of the distributed path);
#   4. throughput at larger batches, and torch.compile (inductor) inference.
#
# Sections run in that order, each under its own timeout; one whose timeout would end past BUDGET_S seconds
# (default 330) from the start is skipped, so the whole script fits a short GPU lease.
#
# Usage: bash benchmarks/gpu_e2e.sh OUT_DIR      (PYTHON=/path/to/python to choose the interpreter)
# Writes OUT_DIR/e2e.jsonl (one `emamba benchmark --json` object per line) and the two runs' summary CSVs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:?usage: gpu_e2e.sh OUT_DIR}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # per-epoch lines only in the log
unset TRITON_INTERPRET
BUDGET_S="${BUDGET_S:-330}"
# a dry run of the plumbing without a GPU: DEVICE=cpu MODEL=emamba_tiny IMG=64 bash benchmarks/gpu_e2e.sh DIR
DEVICE="${DEVICE:-cuda}" MODEL="${MODEL:-emamba_s}" IMG="${IMG:-224}"
START=$SECONDS
failures=0

# run TIMEOUT_S DESCRIPTION CMD...: skip when over budget, else run with a timeout and count failures
run() {
    local limit=$1 what=$2
    shift 2
    local used=$((SECONDS - START))
    if (( used + limit > BUDGET_S )); then
        echo "-- SKIPPED (its ${limit}s limit would pass the budget of ${BUDGET_S}s; ${used}s used): $what"
        return 0
    fi
    echo
    echo "== $what  [t=${used}s]"
    local t0=$SECONDS rc=0
    timeout "$limit" "$@" || rc=$?
    echo "-- rc=$rc, $((SECONDS - t0)) s: $what"
    (( rc == 0 )) || failures=$((failures + 1))
}

bench() {  # bench TIMEOUT_S ARGS...: one `emamba benchmark --json` whose JSON line goes to e2e.jsonl
    local limit=$1
    shift
    run "$limit" "benchmark $*" bash -c '
        set -o pipefail
        "$0" -m emamba.cli benchmark --model "'"$MODEL"'" --img-size "'"$IMG"'" --amp bf16 --device "'"$DEVICE"'" --json "$@" \
            | tee /tmp/emamba_bench.out && tail -1 /tmp/emamba_bench.out >> "'"$OUT_DIR"'/e2e.jsonl"' "$PY" "$@"
}

: > "$OUT_DIR/e2e.jsonl"
bench 60 --bench train --batch-size 32 --backend auto
bench 45 --bench infer --batch-size 32 --backend auto
bench 120 --bench train --batch-size 32 --backend reference --num-bench-iter 5 --num-warm-iter 1
bench 60 --bench infer --batch-size 32 --backend reference --num-bench-iter 5 --num-warm-iter 1

rm -rf /tmp/emamba_gpu_train /tmp/emamba_gpu_fsdp
run 90 "emamba train (bundled default, 4 epochs) on CUDA, --amp bf16" \
    "$PY" -m emamba.train --output_dir /tmp/emamba_gpu_train --amp bf16 --device "$DEVICE"
cp /tmp/emamba_gpu_train/summary.csv "$OUT_DIR/train_cuda_bf16_summary.csv" 2>/dev/null || true
run 75 "torchrun 1 process, --fsdp (NCCL) --amp fp16, 1 epoch" \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m emamba.train \
    --output_dir /tmp/emamba_gpu_fsdp --epochs 1 --fsdp --amp fp16 --device "$DEVICE"
cp /tmp/emamba_gpu_fsdp/summary.csv "$OUT_DIR/fsdp_nccl_fp16_summary.csv" 2>/dev/null || true

bench 60 --bench train --batch-size 32 --backend torch
bench 45 --bench infer --batch-size 32 --backend torch
bench 60 --bench train --batch-size 128 --backend auto
bench 45 --bench infer --batch-size 256 --backend auto
bench 150 --bench infer --batch-size 32 --backend auto --compile

echo
echo "== summary (median ms/step; ratios against the reference backend at the same batch)"
"$PY" - "$OUT_DIR/e2e.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
ref = {(r["bench"], r["batch_size"]): r["step_ms"] for r in rows if r["backend"] == "reference"}
print(f"{'bench':>6} {'batch':>5} {'backend':>10} {'compile':>7} {'ms/step':>9} {'img/s':>8} {'peak MB':>8} {'vs ref':>7}")
for r in rows:
    base = ref.get((r["bench"], r["batch_size"]))
    ratio = f"{base / r['step_ms']:6.1f}x" if base else "      -"
    print(f"{r['bench']:>6} {r['batch_size']:>5} {r['backend']:>10} {str(r['compile']):>7} {r['step_ms']:9.1f} "
          f"{r['samples_per_sec']:8.1f} {r['peak_mem_mb']:8.0f} {ratio:>7}")
if rows:
    print(f"device: {rows[0]['device']}")
EOF
echo "sections failed: $failures; total $((SECONDS - START)) s"
exit $(( failures != 0 ))

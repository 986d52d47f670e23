#!/usr/bin/env bash
# A/B of whole EMamba-S steps: OLD code's `auto`, this tree's `auto` and this tree's `reference`, alternating
# in a rotated order every round (the machine's speed drifts; ratios are taken within a round).
#
#   git worktree add --detach /tmp/old REV
#   bash benchmarks/ab_e2e.sh /tmp/old/src infer 9 results/bench/e2e_infer_ab.jsonl
#
# Appends one `emamba benchmark --json` row per run to OUT, with "code" = old / new; prints step times.
# OLD_SRC "-" runs only this tree (auto and reference, alternating), e.g. to stand in for an AVX2-only CPU on
# an AVX-512 one (each library capped at AVX2; the environment reaches every run):
#   ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 EMAMBA_CPU_CFLAGS=-mno-avx512f \
#     bash benchmarks/ab_e2e.sh - infer 9 results/bench/e2e_infer_avx2cap.jsonl
set -euo pipefail
OLD_SRC=$1; BENCH=$2; ROUNDS=$3; OUT=$4
PY=${PY:-.venv/bin/python}
NEW_SRC=$(pwd)/src
run() {  # code backend
  local src=$NEW_SRC; [[ $1 == old ]] && src=$OLD_SRC
  # the benchmark's last stdout line is its JSON row: tag it with the code version, append it to OUT
  PYTHONPATH=$src $PY -c "from emamba.cli import main; raise SystemExit(main())" \
    benchmark --model emamba_s --bench "$BENCH" --batch-size 4 --img-size 128 --backend "$2" \
    --num-warm-iter 1 --num-bench-iter 5 --json 2>/dev/null | tail -n 1 | $PY -c "
import json, sys
row = json.loads(sys.stdin.read()); row['code'] = '$1'
open('$OUT', 'a').write(json.dumps(row) + '\n')
print('$1 $2', round(row['step_ms'], 1), 'ms')"
}
for r in $(seq 1 "$ROUNDS"); do
  if [[ $OLD_SRC == - ]]; then
    if (( r % 2 )); then run new auto; run new reference; else run new reference; run new auto; fi
    continue
  fi
  case $((r % 3)) in
    0) run old auto; run new auto; run new reference ;;
    1) run new auto; run new reference; run old auto ;;
    2) run new reference; run old auto; run new auto ;;
  esac
done

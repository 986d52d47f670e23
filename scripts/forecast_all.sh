#!/usr/bin/env bash
# Every ETT dataset x horizon x seed with the committed EMamba-TS defaults (look-back 96, features M).
#
#   scripts/forecast_all.sh                     # all 4 datasets x 4 horizons x 3 seeds, one run at a time
#   JOBS=2 DATASETS="ETTh1 ETTh2" SEEDS="2021" scripts/forecast_all.sh
#   python scripts/forecast_table.py results/forecast/ett.jsonl > table.md
#
# Environment: DATA_DIR (ETT-small folder, default ../shared/data/ETT-small), DATASETS, HORIZONS, SEEDS,
# JOBS (parallel runs), RESULTS (JSONL file), LOG_DIR, CKPT_DIR, EXTRA (more `emamba forecast` options).
# A run whose log already ends with its JSON summary is skipped, and a run killed mid-training continues from
# its last finished epoch (`--resume`, same result as an uninterrupted run; its log is appended to), so the
# script resumes after interruption.
# Where configs/forecast/DATA_HORIZON.yaml exists (settings chosen on validation), it is passed as --config.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-../shared/data/ETT-small}
DATASETS=${DATASETS:-"ETTh1 ETTh2 ETTm1 ETTm2"}
HORIZONS=${HORIZONS:-"96 192 336 720"}
SEEDS=${SEEDS:-"2021 2022 2023"}
JOBS=${JOBS:-1}
RESULTS=${RESULTS:-results/forecast/ett.jsonl}
LOG_DIR=${LOG_DIR:-results/forecast/logs}
CKPT_DIR=${CKPT_DIR:-checkpoints/forecast}
EXTRA=${EXTRA:-}
EMAMBA=${EMAMBA:-emamba}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$LOG_DIR" "$(dirname "$RESULTS")"
commands=()
for data in $DATASETS; do
  for pred_len in $HORIZONS; do
    for seed in $SEEDS; do
      log="$LOG_DIR/${data}_96_${pred_len}_seed${seed}.log"
      if [[ -f "$log" ]] && tail -n 1 "$log" | grep -q '"mse"'; then
        echo "skip (done): $log" >&2
        continue
      fi
      # per-(dataset, horizon) settings chosen on the validation split, if any (configs/forecast/README.md)
      config=""
      [[ -f "configs/forecast/${data}_${pred_len}.yaml" ]] && config="--config configs/forecast/${data}_${pred_len}.yaml"
      commands+=("$EMAMBA forecast $config --task_name long_term_forecast --is_training 1 --model EMamba \
--data $data --root_path $DATA_DIR --data_path $data.csv --features M --seq_len 96 --label_len 48 \
--pred_len $pred_len --seed $seed --des table --num_threads $OMP_NUM_THREADS --checkpoints $CKPT_DIR \
--results_file $RESULTS --resume $EXTRA >> $log 2>&1 || echo \"FAILED: $log\" >&2")
    done
  done
done
echo "${#commands[@]} run(s), $JOBS at a time" >&2
printf '%s\0' "${commands[@]+"${commands[@]}"}" | xargs -0 -r -P "$JOBS" -I{} bash -c '{}'

#!/usr/bin/env bash
# CoLA, STS-B and MRPC on the real Gemma 3 270M: LoRA r16 against mobillm-cache (its server choosing
# its cached epochs and lr on held-out cached samples), one seed, one method at a time, 5 minutes of
# training each: long enough on this CPU for LoRA to leave the majority class (docs/benchmarks.md
# "Four GLUE tasks" ran 2 minutes, and LoRA's MRPC F1 stayed under the majority class's 0.812).
# Logs `uptime` every 60 s beside the runs.
set -u
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-docs/runs/glue-gemma}
LOG=${LOG:-$ROOT/glue-gemma.log}
ENGINE=${ENGINE:-/work/qs_out/engine-gemma-3-270m-channel}
mkdir -p "$ROOT"
. bench/paper/uptime_log.sh
log_uptime "$LOG"
for task in ${TASKS:-cola stsb mrpc}; do
  dev=500; [ "$task" = mrpc ] && dev=408
  /work/shared/tools/memcap 14000 "${PYTHON:-python3}" -m mobillm.bench.paper.parity --seeds 0 --methods lora,mobillm-cache --once "" \
      --jobs 1 --out "$ROOT/$task" --work-root "/tmp/glue-work/$task" -- \
      --engine "$ENGINE" --task "$task" --train-rows 2000 --holdout-rows 400 --dev-rows "$dev" --max-len 128 \
      --budget-minutes "${BUDGET_MINUTES:-5}" --evals 3 --no-zero-eval --threads 1 --server-threads 1 \
      --timeout-factor 4 --cache-select 1,2,3,4,6 --cache-select-lrs 5e-4,1e-3 >> "$LOG" 2>&1
  echo "[$task done rc $?] $(uptime)" >> "$LOG"
done

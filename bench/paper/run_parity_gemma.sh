#!/usr/bin/env bash
# The real-model parity run of docs/benchmarks.md "Accuracy parity on the real model (issue 26)".
# Logs `uptime` every 60 s beside the run (the load is part of the record). One method at a time
# (JOBS=1): the budget is wall-clock, so a timed comparison needs the machine to itself.
# mobillm-cache's server chooses its cached epochs and lr on held-out cached samples (--cache-select).
# EXTRA: more compare.py flags, e.g. EXTRA="--cache-ensemble 3 --reuse" (with the same WORK_ROOT:
# LoRA's results reused when its spec is the same, the mobillm runs made again).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/runs/parity-gemma-sst2-select}
LOG=${LOG:-$OUT/parity-gemma.log}
ENGINE=${ENGINE:-/work/qs_out/engine-gemma-3-270m-channel}
mkdir -p "$OUT"
. bench/paper/uptime_log.sh
log_uptime "$LOG"
/work/shared/tools/memcap 14000 "${PYTHON:-python3}" -m mobillm.bench.paper.parity --seeds "${SEEDS:-0,1,2}" \
    --methods lora,mobillm-cache --once "${ONCE-lst,mobillm-local}" --jobs "${JOBS:-1}" --out "$OUT" \
    --work-root "${WORK_ROOT:-/tmp/parity-work-select}" -- \
    --engine "$ENGINE" --task sst2 --train-rows 4000 --holdout-rows 400 --dev-rows 872 --max-len 64 \
    --budget-minutes 3 --evals "${EVALS:-5}" --no-zero-eval --threads 1 --server-threads 1 --timeout-factor 4 \
    --cache-select 1,2,3,4,6 --cache-select-lrs 5e-4,1e-3 ${EXTRA:-} >> "$LOG" 2>&1
echo "[parity done rc $?] $(uptime)" >> "$LOG"

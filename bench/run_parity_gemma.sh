#!/usr/bin/env bash
# The real-model parity run of docs/benchmarks.md "Accuracy parity on the real model (issue 26)".
# Logs `uptime` every 60 s beside the run (the machine is shared: the load is part of the record).
# All four compare.py runs at once (--jobs 4) and three evaluations without t = 0: on a 2-core machine
# at load 15-20 each process gets ~8 % of a core, and evaluations (1,272 rows through Gemma) dominate.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/runs/parity-gemma-sst2}
LOG=${LOG:-/tmp/parity-gemma.log}
ENGINE=${ENGINE:-/work/qs_out/engine-gemma-3-270m-channel}
mkdir -p "$OUT"
( while true; do echo "[uptime $(date +%H:%M:%S)] $(uptime)"; sleep 60; done ) >> "$LOG" 2>&1 &
UPTIME_PID=$!
trap 'kill $UPTIME_PID' EXIT
/work/shared/tools/memcap 14000 "${PYTHON:-python}" bench/parity.py --seeds 0,1,2 --methods lora,mobillm-cache \
    --once lst,mobillm-local --jobs "${JOBS:-4}" --out "$OUT" --work-root /tmp/parity-work -- \
    --engine "$ENGINE" --task sst2 --train-rows 4000 --holdout-rows 400 --dev-rows 872 --max-len 64 \
    --budget-minutes 3 --evals 3 --no-zero-eval --threads 1 --server-threads 1 --timeout-factor 12 >> "$LOG" 2>&1
echo "[parity done rc $?] $(uptime)" >> "$LOG"

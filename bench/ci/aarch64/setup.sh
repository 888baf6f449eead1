#!/usr/bin/env bash
# An aarch64 device under emulation: builds build/aarch64/ (idempotent, cached there) so that
#   build/aarch64/edge-run train|eval|predict ...
# runs mobillm's device side (common, kernels, edge_runtime; no torch) with an arm64 Python 3.11
# under qemu-aarch64-static, with the fused quantizer library cross-compiled for aarch64.
#
# Outside build/ it touches only the host's apt packages qemu-user-static and
# g++-aarch64-linux-gnu (installed when missing; needs root). The arm64 .debs are fetched by a
# private apt state under build/aarch64/apt (no `dpkg --add-architecture`, the host's apt lists
# and status are untouched) and unpacked with `dpkg -x`; the aarch64 wheels come from PyPI with
# `pip download --platform` and are unpacked with `pip install --target` (host pip, no host install).
# Downloads ~150 MB the first time. docs/edge_runtime.md, "aarch64".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
OUT="$ROOT/build/aarch64"
SYSROOT="$OUT/sysroot"
SITE="$OUT/site"
# The host's versions, so both sides run the same numpy/onnxruntime code (override to try others).
HOST_PY="${PYTHON:-python3}"
ver() { "$HOST_PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
WHEELS=("onnxruntime==$(ver onnxruntime 1.32.0)" "numpy==$(ver numpy 2.4.6)" "tokenizers==$(ver tokenizers 0.23.3)"
        "websockets==$(ver websockets 17.4)" "tqdm==$(ver tqdm 4.67.1)")
DEBS=(python3.11-minimal libpython3.11-stdlib libstdc++6 libgcc-s1)
say() { echo "setup-aarch64: $*" >&2; }
mkdir -p "$OUT"

# 1. host tools
if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  say "installing qemu-user-static g++-aarch64-linux-gnu (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-user-static g++-aarch64-linux-gnu
fi

# 2. arm64 Python 3.11 and the C/C++ runtime, from Debian, into the sysroot
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  APT="$OUT/apt"
  mkdir -p "$APT/state/lists/partial" "$APT/cache/archives/partial" "$APT/sources.list.d"
  : > "$APT/status"
  cp /etc/apt/sources.list.d/*.sources "$APT/sources.list.d/" 2>/dev/null || true
  [ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$APT/sources.list" || : > "$APT/sources.list"
  apt_arm64=(apt-get -q -o APT::Architecture=arm64 -o APT::Architectures::=arm64
             -o Dir::State="$APT/state" -o Dir::State::status="$APT/status" -o Dir::Cache="$APT/cache"
             -o Dir::Etc::SourceList="$APT/sources.list" -o Dir::Etc::SourceParts="$APT/sources.list.d"
             -o Debug::NoLocking=1)
  say "fetching arm64 packages: ${DEBS[*]} and their dependencies"
  "${apt_arm64[@]}" update >/dev/null
  "${apt_arm64[@]}" install -y --download-only --no-install-recommends "${DEBS[@]}" >/dev/null
  mkdir -p "$SYSROOT"
  for deb in "$APT"/cache/archives/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
  # Debian's site.py adds these folders; the host has x86 packages there and qemu -L falls back
  # to host paths the sysroot lacks, so empty ones shadow them.
  mkdir -p "$SYSROOT/usr/lib/python3/dist-packages" "$SYSROOT/usr/local/lib/python3.11/dist-packages" \
           "$SYSROOT/usr/lib/python3.11/site-packages"
  rm -rf "$APT/cache/archives"/*.deb
fi
# qemu-user 7.2 shows the host's x86 /proc/cpuinfo, on which onnxruntime's cpuinfo crashes at
# import (SIGSEGV); qemu -L serves a sysroot file first, so an ARM one (Cortex-A72, as a
# Raspberry Pi 4) with the host's processor count stands in.
ncpu=$(( $(cut -d- -f2 /sys/devices/system/cpu/possible 2>/dev/null || echo 0) + 1 ))
mkdir -p "$SYSROOT/proc"
for ((i = 0; i < ncpu; i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n' "$i"
  printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
done > "$SYSROOT/proc/cpuinfo"

# 3. the device's wheels for aarch64 (the torch-free device deps only)
if [ ! -f "$SITE/.wheels-done" ] || [ "$(cat "$SITE/.wheels-done")" != "${WHEELS[*]}" ]; then
  say "fetching aarch64 wheels: ${WHEELS[*]}"
  rm -rf "$SITE" && mkdir -p "$OUT/wheels"
  pip_platform=(--platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
                --only-binary=:all: --python-version 3.11 --implementation cp)
  "$HOST_PY" -m pip download -q --no-cache-dir --no-deps "${pip_platform[@]}" -d "$OUT/wheels" "${WHEELS[@]}"
  "$HOST_PY" -m pip install -q --no-cache-dir --no-deps --no-compile "${pip_platform[@]}" --target "$SITE" \
    $(for w in "${WHEELS[@]}"; do name="${w%%==*}"; v="${w##*==}"; ls "$OUT/wheels/${name}-${v}-"*.whl; done)
  echo "${WHEELS[*]}" > "$SITE/.wheels-done"
fi

# 4. the fused quantizer library, cross-compiled by the root CMakeLists.txt
say "cross-compiling the native kernels (kernels/cpp/aarch64-toolchain.cmake)"
cmake -S "$ROOT" -B "$OUT/native" -DCMAKE_TOOLCHAIN_FILE="$ROOT/kernels/cpp/aarch64-toolchain.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DMOBILLM_CUDA=OFF -DMOBILLM_TENSORRT=OFF -DMOBILLM_ORT=ON >/dev/null
cmake --build "$OUT/native" -j 2 >/dev/null

# 5. mobillm's device packages, installed as `pip install .` would on the board: a copy (not
#    the checkout, whose build/native/lib holds this host's x86 libraries), the libraries in
#    mobillm/kernels/lib. Re-copied on every run so the sysroot follows the checkout.
rm -rf "$SITE/mobillm" && mkdir -p "$SITE/mobillm"
for pkg in common kernels edge_runtime; do
  cp -r "$ROOT/$pkg" "$SITE/mobillm/$pkg"
done
find "$SITE/mobillm" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$SITE/mobillm/kernels/cpp" "$SITE/mobillm/kernels/cuda" "$SITE/mobillm/kernels/trt" \
       "$SITE/mobillm/kernels/torch_codec.py" "$SITE/mobillm/kernels/lib"
mkdir -p "$SITE/mobillm/kernels/lib"
cp "$OUT/native/lib/libmobillm_codec.so" "$OUT/native/lib/libmobillm_ort_ops.so" "$SITE/mobillm/kernels/lib/"

# 6. the wrappers
cat > "$OUT/python" <<WRAP
#!/bin/sh
# arm64 Python 3.11 under emulation with mobillm's device packages (made by bench/ci/aarch64/setup.sh).
# The emulated CPU is a Cortex-A72 (Raspberry Pi 4; Armv8.0 + NEON): MOBILLM_QEMU_CPU=cortex-a76
# (Raspberry Pi 5, close to Jetson Orin's A78AE) or max picks another.
exec env -u PYTHONHOME QEMU_CPU="\${MOBILLM_QEMU_CPU:-cortex-a72}" PYTHONNOUSERSITE=1 PYTHONPATH="$SITE" \\
  qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "\$@"
WRAP
cat > "$OUT/edge-run" <<WRAP
#!/bin/sh
# edge-run on an emulated aarch64 device (made by bench/ci/aarch64/setup.sh)
exec "$OUT/python" -m mobillm.edge_runtime.cli "\$@"
WRAP
chmod +x "$OUT/python" "$OUT/edge-run"
"$OUT/python" -c "import platform, onnxruntime, numpy; from mobillm.kernels import native; \
print('setup-aarch64: python', platform.python_version(), platform.machine(), 'onnxruntime', onnxruntime.__version__, \
'numpy', numpy.__version__, 'codec isa', native.codec_isa())" >&2
say "ready: $OUT/edge-run"

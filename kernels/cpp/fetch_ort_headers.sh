#!/bin/sh
# Unpack ONNX Runtime's C/C++ API headers (Debian's libonnxruntime-dev, MIT licensed) into
# build/_deps/onnxruntime/ without installing anything: apt runs with a private source list
# and state under build/_deps/apt, so the system's apt configuration is left alone.
#
# Only needed where the headers are not installed already: on Debian 13 (trixie) and newer,
# `apt-get install libonnxruntime-dev` puts them in /usr/include/onnxruntime, which CMake
# finds by itself. The pip onnxruntime wheel ships no headers.
#
# Usage: sh kernels/cpp/fetch_ort_headers.sh [debian-suite]   (default: trixie)
set -eu
suite="${1:-trixie}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
deps="$root/build/_deps"
apt_dir="$deps/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$deps/onnxruntime"
echo "deb http://deb.debian.org/debian $suite main" > "$apt_dir/sources.list"
opts="-o Dir::Etc::SourceList=$apt_dir/sources.list -o Dir::Etc::SourceParts=/dev/null \
 -o Dir::State::Lists=$apt_dir/lists -o Dir::Cache=$apt_dir/cache -o Debug::NoLocking=1 \
 -o APT::Sandbox::User=root"
# shellcheck disable=SC2086
apt-get $opts -qq update
cd "$apt_dir"
rm -f libonnxruntime-dev_*.deb
# shellcheck disable=SC2086
apt-get $opts -qq download libonnxruntime-dev
dpkg-deb -x libonnxruntime-dev_*.deb "$deps/onnxruntime"
header="$deps/onnxruntime/usr/include/onnxruntime/onnxruntime_c_api.h"
test -f "$header"
echo "ONNX Runtime headers: $(dirname "$header") ($(grep -m1 '#define ORT_API_VERSION' "$header"))"

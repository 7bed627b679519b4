#!/usr/bin/env bash
# Build the C++ runtime into cpp/build (or $1): fetch dependencies, configure, compile.
#   cpp/build.sh && ctest --test-dir cpp/build
# Extra CMake arguments go after the build directory, e.g.
#   cpp/build.sh cpp/build -DTENSORRT_ROOT=/opt/TensorRT-10.15 -DCUDAToolkit_ROOT=/usr/local/cuda
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="${1:-$HERE/build}"
shift $(( $# > 0 ? 1 : 0 ))
export LLMBUILD_DEPS_DIR="${LLMBUILD_DEPS_DIR:-$HERE/build/_deps}"

mkdir -p "$BUILD"
exec 9>"$BUILD/.build.lock"
flock 9  # one build of this directory at a time (e.g. two test sessions)
"$HERE/setup_deps.sh"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [[ -f "$BUILD/CMakeCache.txt" ]]; then generator=(); fi  # keep the generator it was configured with
cmake -S "$HERE" -B "$BUILD" "${generator[@]}" \
  -DONNXRUNTIME_ROOT="$LLMBUILD_DEPS_DIR/onnxruntime" \
  -DCMAKE_PREFIX_PATH="$LLMBUILD_DEPS_DIR/root/usr" \
  "$@"
cmake --build "$BUILD" --parallel "$(nproc)"

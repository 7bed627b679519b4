#!/usr/bin/env bash
# Fetch what the C++ runtime builds against, into cpp/build/_deps (or $LLMBUILD_DEPS_DIR).
# Idempotent: a second run only checks a stamp and returns.
#
#   _deps/root/usr/include/onnxruntime   ONNX Runtime C/C++ API headers: Debian's
#                                        libonnxruntime-dev (trixie), extracted, not installed
#   _deps/root/usr/share/cmake/nlohmann_json   nlohmann/json (Debian's nlohmann-json3-dev)
#   _deps/onnxruntime/{include,lib}      what CMake's ONNXRUNTIME_ROOT points at: the headers
#                                        above and libonnxruntime.so(.1) linked to the library
#                                        of the `onnxruntime` Python wheel (1.32, serves the
#                                        headers' older API version 21)
#
# Needs root only to apt-get install a missing compiler or cmake. The trixie package index
# lives in a private apt directory (_deps/apt): the system's sources are never touched.
# Overrides: ONNXRUNTIME_LIB=/path/libonnxruntime.so.X (else the wheel of $PYTHON, else a
# `pip download` of the pinned wheel), DEBIAN_MIRROR, PYTHON.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
DEPS="${LLMBUILD_DEPS_DIR:-$HERE/build/_deps}"
# The Debian archive this machine's apt already uses (its first "URIs:" entry whose suite is
# the main archive), so no host is hard-coded here; DEBIAN_MIRROR overrides it.
system_mirror() {
  local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list)
  awk '/^URIs:/ {u=$2} /^Suites:/ && u != "" && $0 !~ /security/ {print u; exit}
       /^deb [a-z]+:\/\// && $0 !~ /security/ {print $2; exit}' "${files[@]}" 2>/dev/null || true
}
MIRROR="${DEBIAN_MIRROR:-$(system_mirror)}"
[[ -n "$MIRROR" ]] || { echo "setup_deps: no Debian archive in /etc/apt sources; set DEBIAN_MIRROR" >&2; exit 1; }
ORT_WHEEL_VERSION="1.32.0"  # pyproject.toml pins the same
STAMP="$DEPS/.complete-v1"

done_already() { [[ -f "$STAMP" && -e "$DEPS/onnxruntime/lib/libonnxruntime.so.1" ]]; }
done_already && exit 0
mkdir -p "$DEPS"
exec 8>"$DEPS/.lock"
flock 8  # another build may be fetching right now
done_already && exit 0

log() { echo "setup_deps: $*" >&2; }

# -- toolchain (system packages, bookworm) -------------------------------------------------
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || missing+=(g++)
command -v make >/dev/null || command -v ninja >/dev/null || missing+=(make)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# -- headers: Debian packages fetched by name through a private apt configuration -----------
mkdir -p "$DEPS/apt/lists/partial" "$DEPS/apt/cache/archives/partial" "$DEPS/apt/sources" \
  "$DEPS/apt/preferences" "$DEPS/debs" "$DEPS/root"
cat >"$DEPS/apt/sources/trixie.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
APT_OPTS=(
  -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$DEPS/apt/sources"
  -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$DEPS/apt/preferences"
  -o "Dir::State::Lists=$DEPS/apt/lists" -o "Dir::Cache=$DEPS/apt/cache"
  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
  -o "APT::Sandbox::User=root"
)
PACKAGES=(libonnxruntime-dev nlohmann-json3-dev)
if ! ls "$DEPS"/debs/libonnxruntime-dev_*.deb "$DEPS"/debs/nlohmann-json3-dev_*.deb >/dev/null 2>&1; then
  log "fetching ${PACKAGES[*]} (Debian trixie) into $DEPS/debs"
  apt-get "${APT_OPTS[@]}" -qq update
  (cd "$DEPS/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PACKAGES[@]}")
fi
for deb in "$DEPS"/debs/*.deb; do
  dpkg -x "$deb" "$DEPS/root"
done
test -f "$DEPS/root/usr/include/onnxruntime/onnxruntime_cxx_api.h"
test -f "$DEPS/root/usr/include/nlohmann/json.hpp"

# -- library: the onnxruntime Python wheel's libonnxruntime ---------------------------------
find_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then echo "$ROOT/.venv/bin/python"
  else command -v python3; fi
}
ort_lib="${ONNXRUNTIME_LIB:-}"
if [[ -z "$ort_lib" ]]; then
  py="$(find_python)"
  capi="$("$py" -c 'import importlib.util as u; s = u.find_spec("onnxruntime"); print(s.submodule_search_locations[0] + "/capi" if s else "")')"
  ort_lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)"
  if [[ -z "$ort_lib" ]]; then
    log "no onnxruntime wheel in $py; downloading onnxruntime==$ORT_WHEEL_VERSION"
    if ! "$py" -m pip --version >/dev/null 2>&1; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
      py=python3
    fi
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$DEPS/wheel" "onnxruntime==$ORT_WHEEL_VERSION"
    "$py" -m zipfile -e "$DEPS"/wheel/onnxruntime-*.whl "$DEPS/wheel/unpacked"
    ort_lib="$(ls "$DEPS"/wheel/unpacked/onnxruntime/capi/libonnxruntime.so.1.* | head -n1)"
  fi
fi
test -f "$ort_lib" || { log "ONNX Runtime library not found: $ort_lib"; exit 1; }

mkdir -p "$DEPS/onnxruntime/lib"
ln -sfn "$DEPS/root/usr/include/onnxruntime" "$DEPS/onnxruntime/include"
ln -sf "$ort_lib" "$DEPS/onnxruntime/lib/libonnxruntime.so"
ln -sf "$ort_lib" "$DEPS/onnxruntime/lib/libonnxruntime.so.1"
touch "$STAMP"
log "ONNX Runtime headers $(dpkg-deb -f "$DEPS"/debs/libonnxruntime-dev_*.deb Version), library $ort_lib"

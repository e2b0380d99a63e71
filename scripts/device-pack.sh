#!/usr/bin/env bash
# Cuts what `scripts/device-check.sh` needs on an air-gapped GPU host into pieces that fit a
# limited transfer: the release binary, the non-base libraries it links (oneDNN) and the GPU
# runtime (`fetch-onnxruntime.sh --gpu`), each file xz-compressed and split into pieces of
# PIECE bytes (default 60 MiB), with a MANIFEST of every whole file's sha256 for the check to
# verify after joining.
#
#   scripts/device-pack.sh                       # everything (~0.9 GB of pieces)
#   scripts/device-pack.sh libcudnn libcublas    # leave out libraries whose names start so
#                                                # (the host has them: see device-check.sh --probe)
#
# Carry `device-pieces/` over (several transfers if need be; the pieces are independent),
# then run `scripts/device-check.sh` there: it joins and checks them first.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/edge-inspect}
PIECE=${PIECE:-60M}
OUT=${OUT:-device-pieces}
[ -x "$BIN" ] || { echo "device-pack: no release binary at $BIN (cargo build --release)" >&2; exit 1; }
runtime=$(dirname "$(scripts/fetch-onnxruntime.sh --gpu)")

skipped() {
    local name=$1 prefix
    for prefix in "${@:2}"; do
        [[ $name == "$prefix"* ]] && return 0
    done
    return 1
}

rm -rf "$OUT"
mkdir -p "$OUT"
files=("$BIN")
# The libraries the binary links beyond a base system: oneDNN (the `train` feature's CPU
# kernels) with the OpenMP and OpenCL loaders it needs. They land beside the GPU runtime,
# which device-check.sh puts on the loader's path.
while read -r lib; do
    files+=("$lib")
done < <(ldd "$BIN" | awk '$1 ~ /^(libdnnl|libgomp|libOpenCL)\./ {print $3}')
for f in "$runtime"/*.so*; do
    [ -L "$f" ] && continue # the unversioned link is remade on the host
    skipped "$(basename "$f")" "$@" || files+=("$f")
done
for f in "${files[@]}"; do
    name=$(basename "$f")
    echo "$(sha256sum < "$f" | cut -d' ' -f1) $name" >> "$OUT/MANIFEST"
    xz -T0 -6 -c "$f" | split -b "$PIECE" -d -a 3 - "$OUT/$name.xz.part-"
done
echo "device-pack: $(ls "$OUT" | grep -c part-) pieces, $(du -sh "$OUT" | cut -f1), in $OUT/" >&2

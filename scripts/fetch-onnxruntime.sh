#!/usr/bin/env bash
# Fetch libonnxruntime.so out of the onnxruntime wheel on PyPI (pinned version and sha256).
#
# Why a wheel: ort's `download-binaries` feature pulls from a CDN that line hosts and CI cannot
# reach; PyPI is reachable, and the CPU wheel carries a plain glibc shared library that needs no
# Python. Idempotent: a verified library already in the cache is reused.
#
# Usage: scripts/fetch-onnxruntime.sh [cache-dir]   (default: $EDGE_INSPECT_CACHE or ./.cache/onnxruntime)
#        scripts/fetch-onnxruntime.sh --gpu [dir]    (default: $EDGE_INSPECT_CACHE or ./.cache/onnxruntime-gpu)
# Prints the library path on stdout; export it as ORT_DYLIB_PATH.
#
# --gpu assembles ONNX Runtime with the CUDA (and TensorRT) execution providers from PyPI
# wheels: onnxruntime-gpu and the NVIDIA runtime wheels its CUDA provider links or loads
# (CUDA runtime, cuBLAS/cuBLASLt, cuRAND, cuDNN, NVRTC), each pinned by version and sha256
# (`pip download --require-hashes`). Every library goes into one flat folder; the provider
# libraries get RUNPATH $ORIGIN (patchelf), so they resolve their CUDA libraries beside
# themselves without LD_LIBRARY_PATH. What the folder cannot hold: the driver (libcuda.so.1,
# from the host's NVIDIA driver, R580+ for CUDA 13) and TensorRT 10 (libnvinfer.so.10,
# libnvonnxparser.so.10: not on PyPI, from the host). SHA256SUMS records every file as
# assembled; a folder that still matches it is reused. About 1.3 GB to download, 2.3 GB on
# disk. See docs/deploy.md ("GPU").
set -euo pipefail

if [ "${1:-}" = "--gpu" ]; then
    shift
    GPU_ORT_VERSION=1.31.1
    repo_root=$(cd "$(dirname "$0")/.." && pwd)
    out=${1:-${EDGE_INSPECT_CACHE:-$repo_root/.cache}/onnxruntime-gpu}
    lib=$out/libonnxruntime.so.$GPU_ORT_VERSION
    if [ -f "$lib" ] && [ -f "$out/SHA256SUMS" ] && (cd "$out" && sha256sum --quiet -c SHA256SUMS >/dev/null 2>&1); then
        echo "$lib"
        exit 0
    fi
    for tool in python3 sha256sum unzip patchelf; do
        command -v "$tool" >/dev/null || { echo "fetch-onnxruntime: '$tool' is required" >&2; exit 1; }
    done
    mkdir -p "$(dirname "$out")"
    tmp=$(mktemp -d "$(dirname "$out")/.fetch-gpu.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    # The pins (CUDA 13 builds; docs/deploy.md says how they were chosen).
    cat > "$tmp/requirements.txt" <<'PINS'
onnxruntime-gpu==1.31.1 --hash=sha256:e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6
nvidia-cuda-runtime==13.5.37 --hash=sha256:df2b79a8852f10d1fef8c848489c49eebb5754051bf870202a862831412b179d
nvidia-cublas==13.10.0.20 --hash=sha256:dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84
nvidia-curand==10.4.5.25 --hash=sha256:22bb226a857e5888fe6b54ae465fc4371296bcff13a35f79e19691bcf454f529
nvidia-cudnn-cu13==9.28.1.4 --hash=sha256:a54f205b1db1f2895d99f398754db1369816f0569dd459731f925635cf7b65ec
nvidia-cuda-nvrtc==13.5.37 --hash=sha256:86b4d68058807988b7d9af5b44917a0601e9c337f35ccd657bfb3c759ff8d8bc
PINS
    echo "fetch-onnxruntime: downloading the GPU wheels (~1.3 GB)" >&2
    # All three platform tags: with fewer, pip misses the nvrtc wheel.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        -r "$tmp/requirements.txt" -d "$tmp/wheels" >&2
    mkdir "$tmp/lib"
    for wheel in "$tmp"/wheels/*.whl; do
        # Shared libraries only; the Python extension module is not needed.
        unzip -q -o -j "$wheel" '*.so' '*.so.*' -x '*cpython*' '*/libnvblas*' -d "$tmp/lib" 2>/dev/null || true
    done
    # The providers link the CUDA libraries by name: find them beside themselves.
    patchelf --set-rpath '$ORIGIN' "$tmp/lib/libonnxruntime_providers_cuda.so" "$tmp/lib/libonnxruntime_providers_tensorrt.so"
    ln -s "libonnxruntime.so.$GPU_ORT_VERSION" "$tmp/lib/libonnxruntime.so"
    (cd "$tmp/lib" && sha256sum -- *.so* > SHA256SUMS)
    rm -rf "$out.old"
    [ -e "$out" ] && mv "$out" "$out.old"
    mv "$tmp/lib" "$out"
    rm -rf "$out.old"
    echo "$lib"
    exit 0
fi

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

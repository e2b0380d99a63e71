#!/usr/bin/env bash
# Installs what edge-inspect needs on a fresh Debian machine and prints the ONNX Runtime
# library path. Idempotent: installed packages and a verified library are reused.
#
# Usage: eval "$(scripts/setup.sh)"   # exports ORT_DYLIB_PATH
set -euo pipefail
repo_root=$(cd "$(dirname "$0")/.." && pwd)

# Debian packages: curl + unzip fetch ONNX Runtime; libclang1-14 is needed by nokhwa's
# bindgen when building the camera feature; mosquitto (broker) and mosquitto-clients are
# what the daemon's tests publish to and what the README's demo shows traffic with; the tests
# also make TLS certificates with openssl and signal the daemon with procps' kill; the unit's
# hardening is scored with systemd's systemd-analyze; patchelf lays out the GPU runtime
# (`fetch-onnxruntime.sh --gpu`, checked by tests/it/gpu_runtime.rs); mesa-vulkan-drivers
# (lavapipe, a CPU Vulkan driver) and libvulkan1 run the GPU training backend's tests
# (tests/it/gpu_train.rs) where there is no GPU; libdnnl-dev (oneDNN 2.6, with g++ to build
# native/onednn.cpp) runs CPU training's convolutions, SiLU and GroupNorm (model::onednn);
# GStreamer sources (feature `gstreamer`) build against libgstreamer1.0-dev and
# libgstreamer-plugins-base1.0-dev (found by pkg-config), and their tests decode H.264 over
# RTSP (plugins-good: rtspsrc; libav: the decoder; plugins-bad: the parser) from a real RTSP
# server (gst-rtsp-server through python3-gi, encoding with plugins-ugly's x264enc);
# GenICam cameras (feature `genicam`) build against libaravis-dev (its .pc file needs
# libusb-1.0-0-dev) and are tested against
# aravis-tools' arv-fake-gv-camera-0.8, a GigE Vision camera on loopback; the Debian packages
# are built with dpkg-deb and dpkg-shlibdeps (dpkg-dev) from stripped binaries (binutils), and
# tests/package.rs installs them with apt and checks the service user (passwd); the review
# page's browser tests drive Debian's chromium through chromium-driver (for the tests only:
# no package of the project depends on a browser).
packages=(curl unzip ca-certificates libclang1-14 mosquitto mosquitto-clients openssl procps systemd patchelf
          mesa-vulkan-drivers libvulkan1 libdnnl-dev g++
          pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
          gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
          python3-gi gir1.2-gst-rtsp-server-1.0 libaravis-dev libusb-1.0-0-dev aravis-tools
          dpkg-dev binutils passwd chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

lib=$("$repo_root/scripts/fetch-onnxruntime.sh")
echo "export ORT_DYLIB_PATH=$lib"
# The pretrained backbone that `retrain` builds a bundle's feature graph from (17 MB).
backbone=$("$repo_root/scripts/fetch-backbone.sh")
echo "export EDGE_INSPECT_BACKBONE=$backbone"
# An S3-compatible server for the upload tests: moto's server, from PyPI wheels pinned with
# hashes, in a venv of its own under target/ (tests only; nothing ships it).
moto_venv="$repo_root/target/test-tools/moto"
if [ ! -x "$moto_venv/bin/moto_server" ] \
    || ! cmp -s "$repo_root/scripts/moto-requirements.txt" "$moto_venv/requirements.txt"; then
    rm -rf "$moto_venv"
    python3 -m venv "$moto_venv" >&2
    "$moto_venv/bin/pip" install --quiet --no-deps --only-binary=:all: --require-hashes \
        -r "$repo_root/scripts/moto-requirements.txt" >&2
    cp "$repo_root/scripts/moto-requirements.txt" "$moto_venv/requirements.txt"
fi
echo "export EDGE_INSPECT_MOTO_SERVER=$moto_venv/bin/moto_server"

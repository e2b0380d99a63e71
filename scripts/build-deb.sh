#!/usr/bin/env bash
# Builds edge-inspect's Debian packages (amd64) from this repository in one command:
#
#   edge-inspect        the edge build (run, check-config, infer, eval, label; V4L2, GStreamer and
#                       GenICam cameras, the embedded broker; no training stack) with ONNX
#                       Runtime's CPU library (the pinned, checksummed wheel of
#                       fetch-onnxruntime.sh), the hardened unit, sysusers.d and tmpfiles.d
#                       entries and /etc/edge-inspect/edge-inspect.toml as a conffile
#   edge-inspect-train  /usr/bin/edge-inspect-train: the full build (retrain, export, synth,
#                       bench; oneDNN CPU kernels, the wgpu backend) and the pretrained backbone
#   edge-inspect-demo   the demo model and frames the shipped config inspects (Architecture: all)
#   edge-inspect-gpu    with --gpu: the CUDA/TensorRT ONNX Runtime set that
#                       `fetch-onnxruntime.sh --gpu` assembles (1.3 GB download), an alternative
#                       to the CPU library
#
# Why dpkg-deb driven by this script rather than cargo-deb: two of the four packages hold no
# cargo artifact (the demo's data, the GPU runtime's wheels), the two binaries are one crate
# built with two feature sets, and the maintainer scripts (check-config before a restart,
# alternatives, purge) are hand-written either way; dpkg-deb and dpkg-shlibdeps (dpkg-dev) are
# on every Debian machine, where cargo-deb would be one more tool to compile in CI.
#
# Usage: scripts/build-deb.sh [--out DIR] [--profile release|dev] [--version V]
#                             [--conffile FILE] [--packages a,b] [--gpu]
#   --out       where the .deb files go (default target/deb)
#   --profile   cargo profile of the binaries (default release; dev builds faster, for tests)
#   --version   package version (default the crate's); the binaries report it in --version
#               and /metrics, with the git commit
#   --conffile  the config installed as /etc/edge-inspect/edge-inspect.toml (default
#               packaging/edge-inspect.toml): a plant's own default for its nodes
#   --packages  which of edge-inspect, edge-inspect-train, edge-inspect-demo to build (default all)
#   --gpu       also build edge-inspect-gpu
# Prints the path of each package built on stdout.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

out=$repo/target/deb
profile=release
crate_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)
version=$crate_version
conffile=$repo/packaging/edge-inspect.toml
packages=edge-inspect,edge-inspect-train,edge-inspect-demo
gpu=0
while [ $# -gt 0 ]; do
    case $1 in
        --out) out=$2; shift 2 ;;
        --profile) profile=$2; shift 2 ;;
        --version) version=$2; shift 2 ;;
        --conffile) conffile=$2; shift 2 ;;
        --packages) packages=$2; shift 2 ;;
        --gpu) gpu=1; shift ;;
        *) echo "build-deb: unknown argument '$1' (see the usage at the top of $0)" >&2; exit 2 ;;
    esac
done
case $profile in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) echo "build-deb: --profile '$profile': expected release or dev" >&2; exit 2 ;;
esac
[ -f "$conffile" ] || { echo "build-deb: --conffile '$conffile': no such file" >&2; exit 2; }
for tool in dpkg-deb dpkg-shlibdeps strip cargo; do
    command -v "$tool" >/dev/null || { echo "build-deb: '$tool' is required (scripts/setup.sh installs it)" >&2; exit 1; }
done
arch=$(dpkg --print-architecture)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/build-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/shlibs/debian"
printf 'Source: edge-inspect\n\nPackage: edge-inspect\nArchitecture: any\n' > "$work/shlibs/debian/control"

wanted() { case ",$packages," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# Builds the binary with cargo arguments "$@" and copies it, stripped, to $dest (both feature
# sets write target/<profile>/edge-inspect, so each is taken as soon as it is built).
build_binary() {
    local dest=$1; shift
    # The version is stamped by build.rs; only a version other than the crate's is passed, so
    # that a build like the tests' is reused as it is.
    if [ "$version" != "$crate_version" ]; then
        export EDGE_INSPECT_PACKAGE_VERSION=$version
    fi
    (cd "$repo" && cargo build --locked --profile "$profile" "$@" >&2)
    install -D -m 0755 "$target_dir/$profile_dir/edge-inspect" "$dest"
    strip --strip-debug --strip-unneeded "$dest"
}

# The Depends of the shared libraries a binary links (dpkg-shlibdeps, from the installed
# packages that provide them).
shlib_depends() {
    local log=$work/shlibs.log
    if ! (cd "$work/shlibs" && dpkg-shlibdeps -O -e "$1" 2>"$log") | sed -n 's/^shlibs:Depends=//p'; then
        cat "$log" >&2
        exit 1
    fi
}

# Writes DEBIAN/control (fields on stdin after the common ones), md5sums and the maintainer
# scripts of $1 (architecture $2), then builds the package, compressed with $3 (default xz).
finish_package() {
    local name=$1 root=$work/$1 pkg_arch=$2 compression=${3:-xz}
    mkdir -p "$root/DEBIAN" "$root/usr/share/doc/$name"
    install -m 0644 "$repo/packaging/copyright" "$root/usr/share/doc/$name/copyright"
    {
        printf 'Package: %s\nVersion: %s\nArchitecture: %s\n' "$name" "$version" "$pkg_arch"
        printf 'Maintainer: edge-inspect developers <edge-inspect@localhost>\n'
        printf 'Installed-Size: %s\nSection: misc\nPriority: optional\n' "$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
        cat
    } > "$root/DEBIAN/control"
    for script in postinst prerm postrm; do
        if [ -f "$repo/packaging/scripts/$name.$script" ]; then
            install -m 0755 "$repo/packaging/scripts/$name.$script" "$root/DEBIAN/$script"
        fi
    done
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 -r md5sum) \
        > "$root/DEBIAN/md5sums"
    local deb=$out/${name}_${version}_${pkg_arch}.deb
    dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >&2
    echo "$deb"
}

build_edge() {
    local root=$work/edge-inspect
    build_binary "$root/usr/bin/edge-inspect" --no-default-features --features camera,gstreamer,genicam,embedded-broker
    local ort
    ort=$("$repo/scripts/fetch-onnxruntime.sh")
    install -D -m 0644 "$ort" "$root/usr/lib/edge-inspect/cpu/$(basename "$ort")"
    ln -s "$(basename "$ort")" "$root/usr/lib/edge-inspect/cpu/libonnxruntime.so"
    install -D -m 0644 "$repo/systemd/edge-inspect.service" "$root/lib/systemd/system/edge-inspect.service"
    install -D -m 0644 "$repo/packaging/edge-inspect.sysusers" "$root/usr/lib/sysusers.d/edge-inspect.conf"
    install -D -m 0644 "$repo/packaging/edge-inspect.tmpfiles" "$root/usr/lib/tmpfiles.d/edge-inspect.conf"
    install -D -m 0644 "$conffile" "$root/etc/edge-inspect/edge-inspect.toml"
    local doc=$root/usr/share/doc/edge-inspect
    install -D -m 0644 -t "$doc" "$repo/docs/deploy.md" "$repo/docs/mqtt.md"
    install -D -m 0644 -t "$doc/examples" "$repo/config/production.example.toml"
    mkdir -p "$root/DEBIAN"
    echo /etc/edge-inspect/edge-inspect.toml > "$root/DEBIAN/conffiles"
    local depends
    depends=$(shlib_depends "$root/usr/bin/edge-inspect")
    finish_package edge-inspect "$arch" <<EOF
Depends: $depends, systemd, passwd
Suggests: mosquitto, edge-inspect-demo, edge-inspect-gpu, edge-inspect-train
Description: visual inspection daemon for factory lines (robust diffusion anomaly maps)
 Captures frames from V4L2, GStreamer (RTSP) and GenICam cameras, runs an ONNX diffusion
 model bundle on them, and publishes anomaly alerts, defect masks and snapshots over MQTT,
 with Prometheus metrics and a hardened systemd service. Includes ONNX Runtime for CPUs.
EOF
}

build_train() {
    local root=$work/edge-inspect-train
    # The dev profile is for tests: the binary is built as the test suite builds it (with
    # the test targets, so that dev-dependencies unify features alike) and its artifacts
    # are reused instead of compiling burn a second time.
    local tests=()
    if [ "$profile" = dev ]; then tests=(--tests); fi
    build_binary "$root/usr/bin/edge-inspect-train" --features gpu-train,genicam --bin edge-inspect "${tests[@]}"
    install -D -m 0644 "$("$repo/scripts/fetch-backbone.sh")" -t "$root/usr/share/edge-inspect/backbone"
    local depends
    depends=$(shlib_depends "$root/usr/bin/edge-inspect-train")
    finish_package edge-inspect-train "$arch" <<EOF
Depends: $depends, edge-inspect
Recommends: libvulkan1
Description: edge-inspect training tools: retrain, export, synth, bench
 edge-inspect-train retrains a model bundle on frames recorded in the field with a robust
 loss, exports it to ONNX and benchmarks it; CPU training runs on oneDNN, GPU training on
 Vulkan (wgpu). Ships the pretrained EfficientNet-Lite0 backbone of the patch model.
EOF
}

build_demo() {
    local root=$work/edge-inspect-demo
    install -D -m 0644 -t "$root/usr/share/edge-inspect/models/brick-huber" "$repo"/models/brick-huber/*
    local frames=$root/usr/share/edge-inspect/demo/frames frame kind
    mkdir -p "$frames"
    for frame in "$repo"/data/brick/test/*/*.png; do
        kind=$(basename "$(dirname "$frame")")
        install -m 0644 "$frame" "$frames/$kind-$(basename "$frame")"
    done
    finish_package edge-inspect-demo all <<EOF
Depends: edge-inspect
Description: edge-inspect demo model and frames
 A model bundle trained on a brick texture and frames of it, some with pasted defects, that
 the shipped /etc/edge-inspect/edge-inspect.toml inspects until it is pointed at a line.
EOF
}

build_gpu() {
    local root=$work/edge-inspect-gpu lib
    lib=$("$repo/scripts/fetch-onnxruntime.sh" --gpu)
    mkdir -p "$root/usr/lib/edge-inspect/gpu"
    cp -a "$(dirname "$lib")"/. "$root/usr/lib/edge-inspect/gpu/"
    # zstd: xz takes many minutes over 2 GB of libraries on a small builder (dpkg >= 1.21.18,
    # Debian 12, reads it).
    finish_package edge-inspect-gpu "$arch" zstd <<EOF
Depends: edge-inspect
Description: edge-inspect GPU runtime: ONNX Runtime with CUDA and TensorRT providers
 ONNX Runtime with its CUDA and TensorRT execution providers and the CUDA libraries they
 load, chosen over the CPU library of edge-inspect (update-alternatives). Needs the host's
 NVIDIA driver (R580+) and, for TensorRT, TensorRT 10 from the host.
EOF
}

if wanted edge-inspect; then build_edge; fi
if wanted edge-inspect-train; then build_train; fi
if wanted edge-inspect-demo; then build_demo; fi
if [ "$gpu" = 1 ]; then build_gpu; fi

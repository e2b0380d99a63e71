#!/usr/bin/env bash
# The prepared GPU check (issue 13): run it on a GPU host, which may be air-gapped — nothing
# here reaches a registry. Everything it needs is brought along beforehand: the release
# binary, the oneDNN libraries it links, and the GPU runtime of
# `scripts/fetch-onnxruntime.sh --gpu` — either as that folder
# or as the pieces `scripts/device-pack.sh` cut (≤ 60 MiB each, xz, sha256-checked), with
# the CUDA libraries the host already has left out.
#
#   scripts/device-check.sh --probe     # what the host has: GPU, driver, CUDA libraries, tools
#   scripts/device-check.sh             # the measurements, into docs/measurements/
#
# It measures, each step logged and timed out on its own so one failure does not lose the
# rest:
#   1. `bench` on CUDA (and TensorRT when the host has libnvinfer.so.10) and on CPU, at
#      batch 1/8/32/128 with 1 and 10 UNet calls, for a 64² and a 256² bundle, plus tiles/s
#      of whole 1280×1024 frames through the tiled 64² model;
#   2. the shipped operating point of a `retrain`-made bundle (head, search, cascade, with
#      its int8 and fp16 copies; made here on the host's CPU): tiles/s at batch 8–256 and
#      MP/s of 1.3 MP (1280×1024) and 4.9 MP (2560×1920) frames, at fp32, fp16 and int8 on
#      each GPU provider, fp32 and int8 on the CPU;
#   3. CPU against GPU outputs of the same images and seeds (`infer`, scores compared): the
#      64² bundle at fp32, and the retrained bundle's verdicts at each precision against the
#      CPU's fp32 ones;
#   4. the GPU training step, when the binary was built with a GPU training backend.
# Environment: BIN (the binary), GPU_ORT_DIR (the runtime folder), PIECES (the pieces'
# folder), OUT (where the measurements go), STEP_TIMEOUT (seconds per step, default 240;
# the retrain gets three times that), RETRAIN_STEPS (the shipped bundle's training steps,
# default 400), PROVIDERS (the GPU providers to measure, default cuda and tensorrt where
# the host has it; "" rehearses the script on a CPU host with its CPU rows only).
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/edge-inspect}
GPU_ORT_DIR=${GPU_ORT_DIR:-.cache/onnxruntime-gpu}
PIECES=${PIECES:-device-pieces}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
OUT=${OUT:-docs/measurements/device-check-$STAMP}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}

probe() {
    echo "## Host"
    echo "- date: $(date -u +%FT%TZ); kernel: $(uname -r); cores: $(nproc); memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
    if command -v nvidia-smi >/dev/null; then
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | paste -sd';')"
    else
        echo "- GPU: nvidia-smi not found"
    fi
    echo "- CUDA libraries the host has (ldconfig and pip's nvidia wheels):"
    for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9 \
               libnvrtc.so.13 libnvinfer.so.10 libnvonnxparser.so.10; do
        found=$(ldconfig -p 2>/dev/null | awk -v l="$lib" '$1 == l {print $NF; exit}')
        [ -z "$found" ] && found=$(find / -xdev -name "$lib" -path '*nvidia*' 2>/dev/null | head -1)
        echo "  - $lib: ${found:-missing}"
    done
    echo "- tools: python3 $(command -v python3 >/dev/null && echo yes || echo no), xz $(command -v xz >/dev/null && echo yes || echo no)"
    echo "- free disk here: $(df -h . | awk 'NR == 2 {print $4}')"
}

if [ "${1:-}" = "--probe" ]; then
    probe
    exit 0
fi

mkdir -p "$OUT"
log() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/device-check.log" >&2; }

# The runtime from pieces, if they came that way: each file's pieces are joined,
# decompressed and checked against the sha256 device-pack.sh recorded.
if [ -f "$PIECES/MANIFEST" ]; then
    mkdir -p "$GPU_ORT_DIR"
    while read -r sha name; do
        [ -f "$GPU_ORT_DIR/$name" ] && echo "$sha  $GPU_ORT_DIR/$name" | sha256sum --quiet -c - 2>/dev/null && continue
        log "assembling $name from its pieces"
        cat "$PIECES/$name".xz.part-* | xz -dc > "$GPU_ORT_DIR/$name.tmp" && mv "$GPU_ORT_DIR/$name.tmp" "$GPU_ORT_DIR/$name"
        echo "$sha  $GPU_ORT_DIR/$name" | sha256sum --quiet -c - || { log "FAILED: $name does not match its sha256"; exit 1; }
        case "$name" in edge-inspect) chmod +x "$GPU_ORT_DIR/$name" ;; esac
    done < "$PIECES/MANIFEST"
    ln -sfn libonnxruntime.so.1.31.1 "$GPU_ORT_DIR/libonnxruntime.so"
    [ -x "$GPU_ORT_DIR/edge-inspect" ] && [ ! -x "$BIN" ] && BIN=$GPU_ORT_DIR/edge-inspect
fi
ORT=$GPU_ORT_DIR/libonnxruntime.so.1.31.1
[ -x "$BIN" ] || { log "no binary at $BIN"; exit 1; }
[ -f "$ORT" ] || { log "no GPU runtime at $ORT"; exit 1; }
# CUDA libraries the host already has (left out of the pieces) are found through the
# loader's path; the folder's own come first.
export LD_LIBRARY_PATH="$GPU_ORT_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export ORT_DYLIB_PATH=$ORT

probe > "$OUT/host.md"
cat "$OUT/host.md" >&2
if [ -n "${PROVIDERS+set}" ]; then
    read -ra providers <<< "$PROVIDERS"
else
    providers=(cuda)
    ldconfig -p 2>/dev/null | grep -q 'libnvinfer.so.10 ' && providers+=(tensorrt)
fi

# Step runner: a timeout per step, its output kept, its status in the summary.
summary=()
step() {
    local name=$1; shift
    log "step $name: $*"
    local start=$(date +%s)
    timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
    local rc=$?
    summary+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "failed (exit $rc)") | $(( $(date +%s) - start )) s |")
    log "step $name: exit $rc"
}

# The bundles: the shipped 64² tiled model, and an untrained 256² one (timing only).
models_dir=$OUT/models
mkdir -p "$models_dir"
if [ ! -f "$models_dir/unet-256/manifest.toml" ]; then
    "$BIN" export --out "$models_dir/unet-256" --size 256 --base-channels 32 --channel-mults 1,2,2 --seed 1 \
        > "$OUT/export-256.log" 2>&1 || log "export of the 256² bundle failed (see export-256.log)"
fi

# The CPU rows are the reference at the batches a CPU host would run.
for provider in "${providers[@]}" cpu; do
    batches=1,8,32,128; big=1,8,32,128; frames=(--frames 1280x1024)
    [ "$provider" = cpu ] && batches=1,8,32 && big=1,8 && frames=()
    step "bench-64-$provider" "$BIN" bench --model models/brick-huber --provider "$provider" --threads "$(nproc)" \
        --batches "$batches" --ddim-steps 1,10 "${frames[@]}" --repeats 10
    [ -f "$models_dir/unet-256/manifest.toml" ] && step "bench-256-$provider" "$BIN" bench --threads "$(nproc)" \
        --model "$models_dir/unet-256" --provider "$provider" --batches "$big" --ddim-steps 1,10 --repeats 10
done

# The shipped operating point: a bundle made by `retrain` as a user would (a head, the
# search, the cascade screen), with int8 and fp16 copies, on a contaminated synthetic set of
# 128² frames at half the photograph's scale. The frames timed are a clean test frame
# mirrored up to size: at the training scale, so the cascade screens what it would on a line.
"$BIN" synth --texture data/textures/gravel.png --out "$OUT/synth" --contamination 0.2 --size 128 --crop 256 \
    > /dev/null 2>&1
shipped=$models_dir/shipped
steps=${RETRAIN_STEPS:-400}
[ -f "$shipped/manifest.toml" ] || STEP_TIMEOUT=$((3 * STEP_TIMEOUT)) step "retrain-shipped" "$BIN" retrain \
    --data "$OUT/synth" --out "$shipped" --force --threads "$(nproc)" --steps "$steps" \
    --head-steps $((steps / 2)) --int8 --fp16 --no-progress
if [ -f "$shipped/manifest.toml" ]; then
    for provider in "${providers[@]}" cpu; do
        precisions=(fp32 fp16 int8); batches=8,32,128,256
        [ "$provider" = cpu ] && precisions=(fp32 int8) && batches=8,32
        for precision in "${precisions[@]}"; do
            step "shipped-$provider-$precision" "$BIN" bench --model "$shipped" --provider "$provider" \
                --precision "$precision" --threads "$(nproc)" --batches "$batches" --repeats 10 \
                --frames 1280x1024,2560x1920 --frame-image "$OUT/synth/test/good/000.png" --frame-repeats 3
        done
    done
fi

# CPU against GPU on the same images and seeds: the 64² bundle at fp32 (scores within
# 1e-3), and the shipped bundle at each precision (verdicts against the CPU's fp32 ones).
compare() { # compare NAME CPU_DIR GPU_DIR MAX_RELATIVE_DIFFERENCE
    step "$1" python3 - "$2/results.jsonl" "$3/results.jsonl" "$4" <<'PY'
import json, sys
cpu, gpu = ([json.loads(l) for l in open(p)] for p in sys.argv[1:3])
assert len(cpu) == len(gpu) > 0, (len(cpu), len(gpu))
worst = max(abs(a["score"] - b["score"]) / max(abs(a["score"]), 1e-9) for a, b in zip(cpu, gpu))
same = sum(a["label"] == b["label"] for a, b in zip(cpu, gpu))
print("| images | worst relative score difference | same verdict |")
print("|---:|---:|---:|")
print(f"| {len(cpu)} | {worst:.2e} | {same}/{len(cpu)} |")
sys.exit(0 if worst < float(sys.argv[3]) and same == len(cpu) else 1)
PY
}
images=(data/brick/test/*/00[0-4].png)
for provider in cpu "${providers[@]}"; do
    step "infer-$provider" "$BIN" infer --model models/brick-huber --out "$OUT/infer-$provider" \
        --provider "$provider" "${images[@]}"
done
shipped_images=("$OUT"/synth/test/*/00[0-9].png)
if [ -f "$shipped/manifest.toml" ]; then
    step "infer-shipped-cpu-fp32" "$BIN" infer --model "$shipped" --out "$OUT/infer-shipped-cpu-fp32" \
        --provider cpu "${shipped_images[@]}"
    for provider in "${providers[@]}"; do
        for precision in fp32 fp16 int8; do
            step "infer-shipped-$provider-$precision" "$BIN" infer --model "$shipped" --provider "$provider" \
                --precision "$precision" --out "$OUT/infer-shipped-$provider-$precision" "${shipped_images[@]}"
        done
    done
fi
if command -v python3 >/dev/null; then
    for provider in "${providers[@]}"; do
        compare "compare-cpu-$provider" "$OUT/infer-cpu" "$OUT/infer-$provider" 1e-3
        [ -f "$shipped/manifest.toml" ] || continue
        # fp16 and int8 are held to their verdicts; their scores differ by design.
        for precision in fp32 fp16 int8; do
            bound=1e-3; [ "$precision" = fp32 ] || bound=1
            compare "compare-shipped-cpu-$provider-$precision" "$OUT/infer-shipped-cpu-fp32" \
                "$OUT/infer-shipped-$provider-$precision" "$bound"
        done
    done
fi

# The GPU training step (a `--features gpu-train` binary): 20 steps of the default UNet
# (batch 16, 64² crops) on the synthetic set; the log has the step times.
step "train-step-gpu" "$BIN" retrain --device wgpu --data "$OUT/synth" --out "$OUT/train-gpu" --force \
    --steps 20 --batch-size 16 --head-steps 0 --fixed-operating-point --no-progress
if grep -q "built without a GPU training backend" "$OUT/train-step-gpu.log"; then
    summary[-1]="| train-step-gpu | not built: this binary has no GPU training backend (--features gpu-train) | – |"
fi
rm -rf "$OUT/synth" "$OUT/train-gpu" "$OUT/train-gpu.report.json" "$OUT/train-gpu.ckpt"

{
    echo "# Device check $STAMP"
    echo
    echo "Command: \`scripts/device-check.sh\` (BIN=$BIN, runtime $ORT)."
    echo
    cat "$OUT/host.md"
    echo
    echo "| step | result | time |"
    echo "|---|---|---:|"
    printf '%s\n' "${summary[@]}"
    for f in "$OUT"/bench-*.md "$OUT"/shipped-*.md "$OUT"/compare-*.md; do
        [ -s "$f" ] || continue
        echo; echo "## $(basename "$f" .md)"; echo; cat "$f"
    done
} > "$OUT/README.md"
rm -rf "$models_dir"
log "written: $OUT/README.md"

#!/usr/bin/env bash
# The long-run comparison behind docs/results.md ("Training length: MSE against the robust
# losses over 5,000 steps"): MSE, Huber and LTS trained side by side, one thread each, on one
# contaminated held-out dataset, exporting an interim bundle every EXPORT_EVERY steps; then
# every interim bundle and the final one scored by `eval` under two fixed rules, so the
# scores differ by the weights only:
#   old/   L1 pixel residual, t0 100, 10 DDIM steps (the previous shipped default)
#   t25/   L1 pixel residual, t0 25, one DDIM step
# on the test set, and again on the training frames (train-old/, train-t25/: image AUROC of
# the contaminated training frames against the clean ones). The final bundle is also scored
# by its own searched operating point (auto/).
#
#   scripts/long-run.sh                       # gravel at 20 %, 5,000 steps (~2.5 h on 2 cores)
#   STEPS=20 EXPORT_EVERY=10 HEAD_STEPS=0 OUT=/tmp/lr scripts/long-run.sh   # a smoke run
#
# Interrupted trainings resume from their checkpoints when the script is run again; bundles
# and reports that exist are kept. Tables: python3 scripts/long-run-tables.py $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-long}
TEXTURE=${TEXTURE:-gravel}
FOREIGN=${FOREIGN:-brick}
LEVEL=${LEVEL:-0.2}
LOSSES=${LOSSES:-"mse huber lts"}
STEPS=${STEPS:-5000}
EXPORT_EVERY=${EXPORT_EVERY:-250}
# Steps of the learned head trained after the last step (as in scripts/heldout-benchmark.sh).
HEAD_STEPS=${HEAD_STEPS:-400}
SEED=${SEED:-0}
# The benchmark UNet and recipe of scripts/heldout-benchmark.sh.
ARCH=(--size 64 --channels 1 --base-channels 16 --channel-mults 1,2,2 --res-blocks 1)

# Texture paths and foreign-texture pairs.
source scripts/textures.sh

[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT/models"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/long-run.log"; }

data="$OUT/data/$TEXTURE-p$LEVEL"
if [ ! -d "$data" ]; then
  log "synth $data"
  "$BIN" synth --texture "$(texture_path "$TEXTURE")" --foreign "$(texture_path "$FOREIGN")" \
    --out "$data" --contamination "$LEVEL" --seed "$SEED"
fi

# The training frames themselves as an anomalib Folder set (good/: the clean ones, bad/: the
# contaminated ones synth.json lists; no masks): how far each model still tells its own
# defective training frames apart (image AUROC) shows whether it learnt to draw their defects.
trainset="$data-trainset"
if [ ! -d "$trainset" ]; then
  log "trainset $trainset"
  python3 - "$data" "$trainset" <<'PY'
import json, os, shutil, sys
data, out = sys.argv[1], sys.argv[2]
with open(os.path.join(data, "synth.json")) as f:
    defective = {d["file"] for d in json.load(f)["contaminated_train"]}
for name in sorted(os.listdir(os.path.join(data, "train/good"))):
    kind = "bad" if f"train/good/{name}" in defective else "good"
    os.makedirs(os.path.join(out, kind), exist_ok=True)
    shutil.copy(os.path.join(data, "train/good", name), os.path.join(out, kind, name))
PY
fi

train() {
  local loss=$1 model="$OUT/models/$TEXTURE-p$LEVEL-$1"
  [ -f "$model/manifest.toml" ] && return 0
  local resume=()
  [ -d "$OUT/models/.$TEXTURE-p$LEVEL-$loss.checkpoint" ] && resume=(--resume)
  log "retrain $model ${resume[*]}"
  local start
  start=$(date +%s)
  RAYON_NUM_THREADS=1 "$BIN" retrain --data "$data" --loss "$loss" --out "$model" "${resume[@]}" \
    "${ARCH[@]}" --steps "$STEPS" --batch-size 8 --learning-rate 5e-4 --seed "$SEED" --no-progress \
    --unet-budget 10 --head-steps "$HEAD_STEPS" --export-every "$EXPORT_EVERY" --checkpoint-every 100 --threads 1 >>"$OUT/$loss.log" 2>&1
  log "retrain $model took $(( $(date +%s) - start )) s"
}
for loss in $LOSSES; do train "$loss" & done
wait

score() {
  local model=$1 set=$2 report=$3
  shift 3
  [ -f "$report/report.json" ] && return 0
  "$BIN" eval --model "$model" --data "$set" --out "$report" --overlays 0 --no-progress --threads 2 "$@" \
    >/dev/null 2>>"$OUT/long-run.log"
}
OLD=(--anomaly-map l1 --no-ensemble --sampler ddim --t0 100 --steps 10 --condition 0)
T25=(--anomaly-map l1 --no-ensemble --sampler ddim --t0 25 --steps 1 --condition 0)
for loss in $LOSSES; do
  model="$OUT/models/$TEXTURE-p$LEVEL-$loss"
  for bundle in "$model.interim"/step-* "$model"; do
    step=$( [ "$bundle" = "$model" ] && echo "$STEPS" || basename "$bundle" | sed 's/step-0*//' )
    log "eval $loss at step $step"
    score "$bundle" "$data" "$OUT/eval/old/$loss-$step" "${OLD[@]}"
    score "$bundle" "$data" "$OUT/eval/t25/$loss-$step" "${T25[@]}"
    score "$bundle" "$trainset" "$OUT/eval/train-old/$loss-$step" "${OLD[@]}"
    score "$bundle" "$trainset" "$OUT/eval/train-t25/$loss-$step" "${T25[@]}"
  done
  score "$model" "$data" "$OUT/eval/auto/$loss-$STEPS"
done
log "done; tables: python3 scripts/long-run-tables.py $OUT"

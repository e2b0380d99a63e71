#!/usr/bin/env bash
# The held-out benchmark behind docs/results.md ("Held-out textures"): tuning texture brick,
# held-out textures grass and gravel (never used to choose any parameter). For each texture
# and contamination level: `synth` the dataset, `retrain` MSE / Huber / LTS with the
# operating-point search (budget: UNET_BUDGET calls per tile, on synthetic scratches, holes
# and stains pasted on the calibration frames) and the learned head (HEAD_STEPS steps, on
# the same shapes pasted on training frames; shipped only if it wins the search), then
# `eval` twice on the test set (all five defect shapes; cracks and foreign patches were
# never used by the search or the head):
#   eval-auto/  the manifest's own operating point (what the daemon would run)
#   eval-old/   the previous shipped default: L1 pixel residual, t0 100, 10 DDIM steps
#
#   scripts/heldout-benchmark.sh
#   LEVELS=0.2 TEXTURES="grass gravel" scripts/heldout-benchmark.sh
#
# Re-running skips datasets, models and reports that already exist. Everything lands in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-heldout}
TEXTURES=${TEXTURES:-"brick grass gravel"}
LEVELS=${LEVELS:-"0 0.1 0.2 0.3"}
LOSSES=${LOSSES:-"mse huber lts"}
STEPS=${STEPS:-200}
UNET_BUDGET=${UNET_BUDGET:-10}
# Steps of the learned defect head (0: no head, the searched pixel map only).
HEAD_STEPS=${HEAD_STEPS:-400}
THREADS=${THREADS:-2}
SEED=${SEED:-0}
# The benchmark UNet of docs/results.md: small enough for dozens of trainings on 2 cores.
# BASE changes its width for the width study; SUFFIX tells such models and reports apart
# (e.g. SUFFIX=-w32-s800).
BASE=${BASE:-16}
SUFFIX=${SUFFIX:-}
ARCH=(--size 64 --channels 1 --base-channels "$BASE" --channel-mults 1,2,2 --res-blocks 1)

# Texture paths and foreign-texture pairs.
source scripts/textures.sh

[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/benchmark.log"; }

for texture in $TEXTURES; do
  for p in $LEVELS; do
    data="$OUT/data/$texture-p$p"
    if [ ! -d "$data" ]; then
      log "synth $data"
      "$BIN" synth --texture "$(texture_path "$texture")" --foreign "$(texture_path "$(foreign_of "$texture")")" \
        --out "$data" --contamination "$p" --seed "$SEED"
    fi
    for loss in $LOSSES; do
      model="$OUT/models/$texture-p$p-$loss$SUFFIX"
      if [ ! -f "$model/manifest.toml" ]; then
        log "retrain $model"
        start=$(date +%s)
        RAYON_NUM_THREADS=$THREADS "$BIN" retrain --data "$data" --loss "$loss" --out "$model" --force \
          "${ARCH[@]}" --steps "$STEPS" --batch-size 8 --learning-rate 5e-4 --seed "$SEED" --no-progress \
          --unet-budget "$UNET_BUDGET" --head-steps "$HEAD_STEPS" --threads "$THREADS" >>"$OUT/benchmark.log" 2>&1
        log "retrain $model took $(( $(date +%s) - start )) s"
      fi
      report="$OUT/eval-auto/$texture-p$p-$loss$SUFFIX"
      if [ ! -f "$report/report.json" ]; then
        log "eval $report"
        "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 6 --no-progress \
          --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
      fi
      report="$OUT/eval-old/$texture-p$p-$loss$SUFFIX"
      if [ ! -f "$report/report.json" ]; then
        log "eval $report"
        "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 0 --no-progress \
          --anomaly-map l1 --no-ensemble --sampler ddim --t0 100 --steps 10 --condition 0 \
          --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
      fi
    done
  done
done
log "done; tables: python3 scripts/heldout-tables.py $OUT"

#!/usr/bin/env bash
# The contamination benchmark behind docs/results.md: for each texture and contamination
# level, build the dataset with `edge-inspect synth`, train MSE / Huber / LTS models with
# `edge-inspect retrain`, and score them with `edge-inspect eval`; then the quality-vs-
# compute curve (t0, DDIM steps, DDPM 250) of one model. Everything lands in bench-out/.
#
#   scripts/benchmark.sh                    # full run (~1.5 h on 2 cores; see docs/results.md)
#   STEPS=40 TEXTURES=brick LEVELS=0.2 scripts/benchmark.sh   # a quick smoke run
#
# Re-running skips datasets, models and reports that already exist.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-out}
TEXTURES=${TEXTURES:-"brick grass"}
LEVELS=${LEVELS:-"0 0.1 0.2 0.3"}
LOSSES=${LOSSES:-"mse huber lts"}
STEPS=${STEPS:-200}
BATCH=${BATCH:-8}
LR=${LR:-5e-4}
THREADS=${THREADS:-2}
SEED=${SEED:-0}
TEXTURE_DIR=${TEXTURE_DIR:-../shared/data/textures}
# The UNet of the benchmark: small enough for 24 trainings on a 2-core machine.
ARCH=(--size 64 --channels 1 --base-channels 16 --channel-mults 1,2,2 --res-blocks 1)

[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/benchmark.log"; }

for texture in $TEXTURES; do
  other=$( [ "$texture" = brick ] && echo grass || echo brick )
  for p in $LEVELS; do
    data="$OUT/data/$texture-p$p"
    if [ ! -d "$data" ]; then
      log "synth $data"
      "$BIN" synth --texture "$TEXTURE_DIR/$texture.png" --foreign "$TEXTURE_DIR/$other.png" \
        --out "$data" --contamination "$p" --seed "$SEED"
    fi
    for loss in $LOSSES; do
      model="$OUT/models/$texture-p$p-$loss"
      if [ ! -f "$model/manifest.toml" ]; then
        log "retrain $model"
        start=$(date +%s)
        RAYON_NUM_THREADS=$THREADS "$BIN" retrain --data "$data" --loss "$loss" --out "$model" --force \
          "${ARCH[@]}" --steps "$STEPS" --batch-size "$BATCH" --learning-rate "$LR" --seed "$SEED" --no-progress \
          --threads "$THREADS" 2>>"$OUT/benchmark.log"
        log "retrain $model took $(( $(date +%s) - start )) s"
      fi
      report="$OUT/eval/$texture-p$p-$loss"
      if [ ! -f "$report/report.json" ]; then
        log "eval $report"
        "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 6 --no-progress \
          --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
      fi
      # Again at the best operating point of the curve below (t0 25, one DDIM step).
      report="$OUT/eval-t25/$texture-p$p-$loss"
      if [ ! -f "$report/report.json" ]; then
        log "eval $report"
        "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 0 --no-progress \
          --sampler ddim --t0 25 --steps 1 --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
      fi
    done
  done
done

# Quality vs compute on one contaminated dataset, one robust model.
CURVE_MODEL=${CURVE_MODEL:-$OUT/models/brick-p0.1-huber}
CURVE_DATA=${CURVE_DATA:-$OUT/data/brick-p0.1}
if [ -f "$CURVE_MODEL/manifest.toml" ]; then
  for setting in "ddim 10 1" "ddim 25 1" "ddim 25 5" "ddim 50 1" "ddim 50 5" "ddim 100 5" "ddim 100 10" "ddim 250 10" "ddim 250 25" "ddim 250 50" "ddpm 250 250"; do
    set -- $setting
    report="$OUT/curve/$1-t$2-s$3"
    if [ ! -f "$report/report.json" ]; then
      log "eval $report"
      "$BIN" eval --model "$CURVE_MODEL" --data "$CURVE_DATA" --out "$report" --overlays 0 --no-progress \
        --sampler "$1" --t0 "$2" --steps "$3" --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
    fi
  done
fi
python3 scripts/results-tables.py "$OUT"
python3 scripts/results-tables.py "$OUT" eval-t25

#!/usr/bin/env bash
# The normal-patch model on held-out textures (docs/results.md, "Pretrained patch features"):
# for each texture, contamination level and seed, `synth` a dataset, `retrain` only as far as
# the patch model needs (a few UNet steps; the `patch` rule reads the frame, not the
# reconstruction) with `--patch-model gaussian` at each trim, and `eval` the patch rule on
# the test set (all five defect shapes). grass and gravel were never used to choose any
# parameter of the patch model; its recipe (blocks 2 + 4, 128-pixel input, reflect padding)
# comes from ../shared/reference/pretrained-features.md.
#
#   scripts/patch-benchmark.sh
#   TEXTURES=gravel SEEDS=0 TRIMS="0 0.1" scripts/patch-benchmark.sh
#
# Re-running skips datasets, models and reports that already exist. Everything lands in $OUT;
# the table: python3 scripts/patch-tables.py $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-patch}
TEXTURES=${TEXTURES:-"grass gravel"}
LEVELS=${LEVELS:-"0 0.2"}
SEEDS=${SEEDS:-"0 1 2"}
TRIMS=${TRIMS:-"0 0.1"}
THREADS=${THREADS:-2}
ARCH=(--size 64 --channels 1 --base-channels 16 --channel-mults 1,2,2 --res-blocks 1)

texture_path() {
  case "$1" in
    gravel) echo data/textures/gravel.png ;;
    *) echo ../shared/data/textures/$1.png ;;
  esac
}
foreign_of() {
  case "$1" in
    brick) echo grass ;;
    grass) echo gravel ;;
    gravel) echo brick ;;
  esac
}

[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/benchmark.log"; }

for texture in $TEXTURES; do
  for p in $LEVELS; do
    for seed in $SEEDS; do
      data="$OUT/data/$texture-p$p-s$seed"
      if [ ! -d "$data" ]; then
        log "synth $data"
        "$BIN" synth --texture "$(texture_path "$texture")" --foreign "$(texture_path "$(foreign_of "$texture")")" \
          --out "$data" --contamination "$p" --seed "$seed"
      fi
      for trim in $TRIMS; do
        name="$texture-p$p-s$seed-trim$trim"
        model="$OUT/models/$name"
        if [ ! -f "$model/manifest.toml" ]; then
          log "retrain $model"
          RAYON_NUM_THREADS=$THREADS "$BIN" retrain --data "$data" --loss huber --out "$model" --force \
            "${ARCH[@]}" --steps 20 --batch-size 8 --seed "$seed" --no-progress --threads "$THREADS" \
            --fixed-operating-point --anomaly-map patch --t0 10 --reverse-steps 1 \
            --patch-model gaussian --patch-trim "$trim" >>"$OUT/benchmark.log" 2>&1
        fi
        report="$OUT/eval/$name"
        if [ ! -f "$report/report.json" ]; then
          log "eval $report"
          "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 4 --no-progress \
            --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
        fi
      done
    done
  done
done
log "done; table: python3 scripts/patch-tables.py $OUT"

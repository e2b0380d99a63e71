#!/usr/bin/env bash
# Pretrained patch features on held-out textures (docs/results.md, "Pretrained patch
# features"). For each texture and seed at CONTAMINATION: `synth` a dataset (its test set
# with the held-out families wear and dent besides the five usual shapes), then
#   fused/    `retrain` LOSS (the issue's recipe: STEPS 800 UNet steps, the operating-point
#             search within 10 UNet calls, a learned head of HEAD_STEPS 400 steps shipped
#             where it wins) with the normal-patch model (trim 0.1) fused into the chosen
#             rule at weight FUSION (0.5, or `auto`: the search's choice);
#             `eval` three times on the test set (all seven defect shapes):
#               eval/fused     the manifest as shipped (searched rule + patch map, the
#                              cascade's screen where retrain chose one)
#               eval/noscreen  --no-screen: every tile reconstructed (the screen's cost)
#               eval/recon     --no-fusion: the chosen rule alone (reconstruction or head)
#               eval/patch     --anomaly-map patch: the patch model alone (trim 0.1)
#   untrimmed/ the patch model alone fitted without the trim (the contamination's cost),
#             on a UNet trained only 20 steps (the patch rule does not read it).
# grass and gravel were never used to choose any parameter of the patch model or the
# fusion (their recipe comes from ../shared/reference/pretrained-features.md); wear and dent
# were never drawn by anything in training, the contamination or the search.
#
#   scripts/patch-benchmark.sh
#   TEXTURES=gravel SEEDS=0 scripts/patch-benchmark.sh
#   OUT=bench-lofo UNTRIMMED=0 FUSION=auto scripts/patch-benchmark.sh  (leave-one-group-out round)
#   OUT=bench-headpatch UNTRIMMED=0 EXTRA=--head-patch-channel scripts/patch-benchmark.sh
#   OUT=bench-cascade UNTRIMMED=0 NATIVE=1 TEXTURES=gravel scripts/patch-benchmark.sh  (the cascade)
#   OUT=bench-native-lofo UNTRIMMED=0 NATIVE=1 TEXTURES=gravel scripts/patch-benchmark.sh
#   OUT=bench-screen64 UNTRIMMED=0 SCREEN_EVALS=0.8 scripts/patch-benchmark.sh  (the cascade at 64²)
#
# Re-running skips datasets, models and reports that already exist. Everything lands in
# $OUT; the tables: python3 scripts/patch-tables.py $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-patch}
TEXTURES=${TEXTURES:-"grass gravel"}
SEEDS=${SEEDS:-"0 1 2"}
CONTAMINATION=${CONTAMINATION:-0.2}
STEPS=${STEPS:-800}
HEAD_STEPS=${HEAD_STEPS:-400}
LOSS=${LOSS:-huber}
# The patch map's fusion weight: 0.5 (retrain's default) or `auto` (searched on the family
# groups; measured worse in the leave-one-group-out round, docs/results.md).
FUSION=${FUSION:-0.5}
# 0 skips the untrimmed patch models (the trim's cost, measured in the round before).
UNTRIMMED=${UNTRIMMED:-1}
# 1: native resolution: 256×256 frames with defects drawn as for a 64-pixel image (3–20 px),
# inspected in 64-pixel tiles (stride 48, retrain's default); 20 good and 6 per defect type
# in the test set. Use an OUT of its own.
NATIVE=${NATIVE:-0}
# Extra evals of the shipped bundle with the cascade's screen at these recalls
# (eval/screen-R/, `--screen-recall R`), e.g. "0.8 0.9".
read -r -a SCREEN_EVALS <<< "${SCREEN_EVALS:-}"
# More retrain flags for a variant of the recipe (e.g. --head-patch-channel); use an OUT of
# its own.
read -r -a EXTRA <<< "${EXTRA:-}"
SYNTH_SIZE=()
[ "$NATIVE" = 1 ] && SYNTH_SIZE=(--size 256 --crop 256 --defect-extent 64 --test-good 20 --test-per-type 6)
THREADS=${THREADS:-2}
ARCH=(--size 64 --channels 1 --base-channels 16 --channel-mults 1,2,2 --res-blocks 1)

# Texture paths and foreign-texture pairs.
source scripts/textures.sh

[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/benchmark.log"; }
evaluate() { # report-dir model data [eval flags]
  local report=$1 model=$2 data=$3
  shift 3
  if [ ! -f "$report/report.json" ]; then
    log "eval $report"
    "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 4 --no-progress \
      --threads "$THREADS" "$@" >/dev/null 2>>"$OUT/benchmark.log"
  fi
}

for texture in $TEXTURES; do
  for seed in $SEEDS; do
    data="$OUT/data/$texture-p$CONTAMINATION-s$seed"
    if [ ! -d "$data" ]; then
      log "synth $data"
      "$BIN" synth --texture "$(texture_path "$texture")" --foreign "$(texture_path "$(foreign_of "$texture")")" \
        --out "$data" --contamination "$CONTAMINATION" --seed "$seed" --held-out-families "${SYNTH_SIZE[@]}"
    fi
    name="$texture-p$CONTAMINATION-s$seed-$LOSS"
    model="$OUT/models/fused/$name"
    if [ ! -f "$model/manifest.toml" ]; then
      log "retrain $model"
      start=$(date +%s)
      RAYON_NUM_THREADS=$THREADS "$BIN" retrain --data "$data" --loss "$LOSS" --out "$model" --force \
        "${ARCH[@]}" --steps "$STEPS" --batch-size 8 --learning-rate 5e-4 --seed "$seed" --no-progress \
        --threads "$THREADS" --unet-budget 10 --head-steps "$HEAD_STEPS" --patch-model gaussian --patch-trim 0.1 --patch-fusion "$FUSION" "${EXTRA[@]}" \
        >>"$OUT/benchmark.log" 2>&1
      log "retrain $model took $(( $(date +%s) - start )) s"
    fi
    evaluate "$OUT/eval/fused/$name" "$model" "$data"
    evaluate "$OUT/eval/noscreen/$name" "$model" "$data" --no-screen
    evaluate "$OUT/eval/recon/$name" "$model" "$data" --no-fusion
    evaluate "$OUT/eval/patch/$name" "$model" "$data" --anomaly-map patch
    for recall in "${SCREEN_EVALS[@]}"; do
      evaluate "$OUT/eval/screen-$recall/$name" "$model" "$data" --screen-recall "$recall"
    done
    [ "$UNTRIMMED" = 1 ] || continue
    untrimmed="$OUT/models/untrimmed/$name"
    if [ ! -f "$untrimmed/manifest.toml" ]; then
      log "retrain $untrimmed"
      RAYON_NUM_THREADS=$THREADS "$BIN" retrain --data "$data" --loss "$LOSS" --out "$untrimmed" --force \
        "${ARCH[@]}" --steps 20 --batch-size 8 --seed "$seed" --no-progress --threads "$THREADS" \
        --fixed-operating-point --anomaly-map patch --t0 10 --reverse-steps 1 \
        --patch-model gaussian --patch-trim 0 --patch-fusion 0 >>"$OUT/benchmark.log" 2>&1
    fi
    evaluate "$OUT/eval/untrimmed/$name" "$untrimmed" "$data"
  done
done
log "done; tables: python3 scripts/patch-tables.py $OUT"

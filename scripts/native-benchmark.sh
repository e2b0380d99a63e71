#!/usr/bin/env bash
# Resize-to-64 vs tiled inspection at native scale (docs/results.md, "Native resolution"):
# 256×256 frames cut from a texture photograph at native scale with small defects (drawn
# as for a 64-pixel image: 3–20 px), one model that shrinks each frame to 64×64 and one
# that inspects it in 64-pixel tiles (stride 48) at native scale, both trained on the same
# frames with the operating-point search, both scored by `eval` against the native masks
# (the resize model's maps are resampled to 256×256).
#
#   scripts/native-benchmark.sh
#   TEXTURE=grass scripts/native-benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-native}
TEXTURE=${TEXTURE:-brick}
STEPS=${STEPS:-200}
THREADS=${THREADS:-2}
ARCH=(--size 64 --channels 1 --base-channels 16 --channel-mults 1,2,2 --res-blocks 1)
COMMON=(--loss huber --steps "$STEPS" --batch-size 8 --learning-rate 5e-4 --seed 0 --no-progress --threads "$THREADS")

[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/benchmark.log"; }

data="$OUT/data/$TEXTURE-native"
if [ ! -d "$data" ]; then
  log "synth $data"
  "$BIN" synth --texture "../shared/data/textures/$TEXTURE.png" --out "$data" --size 256 --crop 256 \
    --defect-extent 64 --train 60 --test-good 20 --test-per-type 6 --contamination 0.1 --seed 0
fi
for mode in resize tiled; do
  model="$OUT/models/$TEXTURE-$mode"
  extra=(--inspection resize)
  [ "$mode" = tiled ] && extra=(--inspection tiled --tile-stride 48)
  if [ ! -f "$model/manifest.toml" ]; then
    log "retrain $model"
    start=$(date +%s)
    RAYON_NUM_THREADS=$THREADS "$BIN" retrain --data "$data" --out "$model" --force "${ARCH[@]}" "${COMMON[@]}" \
      "${extra[@]}" >>"$OUT/benchmark.log" 2>&1
    log "retrain $model took $(( $(date +%s) - start )) s"
  fi
  report="$OUT/eval/$TEXTURE-$mode"
  if [ ! -f "$report/report.json" ]; then
    log "eval $report"
    resize=()
    [ "$mode" = resize ] && resize=(--resize)
    "$BIN" eval --model "$model" --data "$data" --out "$report" "${resize[@]}" --overlays 4 --no-progress \
      --threads "$THREADS" >/dev/null 2>>"$OUT/benchmark.log"
  fi
done
# Detection vs defect size: `infer` on every test image (the manifest's own threshold), joined
# with synth.json's record of each defect's size.
for mode in resize tiled; do
  out="$OUT/infer/$TEXTURE-$mode"
  if [ ! -f "$out/results.jsonl" ]; then
    log "infer $out"
    "$BIN" infer --model "$OUT/models/$TEXTURE-$mode" --out "$out" --threads "$THREADS" \
      "$data"/test/*/*.png >/dev/null 2>>"$OUT/benchmark.log"
  fi
done
log "done"
python3 - "$OUT" "$TEXTURE" <<'EOF'
import json, sys
out, texture = sys.argv[1], sys.argv[2]
print("| inspection | UNet calls per tile | ms per frame | pixel AUROC | pixel AUPRC | AUPRO@0.3 | image AUROC | per type: pixel AUROC (scratch / hole / stain / crack / foreign) |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for mode in ["resize", "tiled"]:
    r = json.load(open(f"{out}/eval/{texture}-{mode}/report.json"))
    o = r["overall"]
    f = lambda v: "–" if v is None else f"{v:.3f}"
    types = " / ".join(f(r["per_type"][t]["pixel_auroc"]) for t in ["scratch", "hole", "stain", "crack", "foreign"])
    print(f"| {mode} | {r['unet_calls_per_image']} | {r['ms_per_image']:.0f} | {f(o['pixel_auroc'])} | {f(o['pixel_ap'])} | "
          f"{f(o['pixel_aupro'])} | {f(o['image_auroc'])} | {types} |")

# Detection vs defect size (image verdicts at the calibrated threshold).
synth = json.load(open(f"{out}/data/{texture}-native/synth.json"))
area = {d["file"]: d["area"] for d in synth["test_defects"]}
buckets = [(0, 30, "< 30 px"), (30, 100, "30–99 px"), (100, 300, "100–299 px"), (300, 10**9, "≥ 300 px")]
print()
print("| inspection | clean frames flagged | " + " | ".join(f"defects {b[2]} found" for b in buckets) + " |")
print("|---|---:|" + "---:|" * len(buckets))
for mode in ["resize", "tiled"]:
    lines = [json.loads(l) for l in open(f"{out}/infer/{texture}-{mode}/results.jsonl")]
    verdict = {l["image"].split(f"{texture}-native/")[1]: l["label"] == "anomalous" for l in lines}
    good = [v for k, v in verdict.items() if k.startswith("test/good/")]
    cells = []
    for lo, hi, _ in buckets:
        hits = [verdict[f] for f, a in area.items() if lo <= a < hi and f in verdict]
        cells.append(f"{sum(hits)}/{len(hits)}" if hits else "–")
    print(f"| {mode} | {sum(good)}/{len(good)} | " + " | ".join(cells) + " |")
EOF

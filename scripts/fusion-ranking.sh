#!/usr/bin/env bash
# How well the search's criterion ranks the fusion weights it chooses among, against the
# held-out truth (docs/results.md, "Leave-one-group-out selection"). For every bundle that
# scripts/patch-benchmark.sh made with FUSION=auto, `eval` the test set at each fusion weight
# the benchmark did not already score: `recon` is weight 0 (a standardisation does not change
# AUROC or AUPRC), `patch` is weight 1, `fused` the weight the search chose.
#
#   OUT=bench-lofo scripts/fusion-ranking.sh
#
# Then: python3 scripts/patch-tables.py $OUT (its last tables compare criterion and truth).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-lofo}
THREADS=${THREADS:-2}

for model in "$OUT"/models/fused/*/; do
  name=$(basename "$model")
  data="$OUT/data/${name%-*}"
  for weight in 0.25 0.5 0.75; do
    report="$OUT/eval/w$weight/$name"
    [ -f "$report/report.json" ] && continue
    echo "[$(date -u +%H:%M:%S)] eval $report"
    # A bundle whose search chose weight 1 ships the patch rule and no standardisation to
    # re-weight: its eval refuses, and the tables mark the weights as not scored.
    "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 0 --no-progress \
      --threads "$THREADS" --fusion-weight "$weight" >/dev/null 2>>"$OUT/ranking.log" ||
      echo "  refused: see $OUT/ranking.log"
  done
done

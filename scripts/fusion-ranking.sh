#!/usr/bin/env bash
# How well the search's criterion ranks what it chooses among, against the held-out truth
# (docs/results.md, "Leave-one-group-out selection"). For every bundle that
# scripts/patch-benchmark.sh made with FUSION=auto, `eval` on its test set:
#   w<W>/   the fusion at each weight the benchmark did not already score (`recon` is weight
#           0: a standardisation does not change AUROC or AUPRC; `patch` is weight 1;
#           `fused` is the weight the search chose);
#   pixel/  the best single-reconstruction pixel rule the search scored (its t0, steps,
#           conditioning and map rule, alone): what the shipped rule competed with.
#
#   OUT=bench-lofo scripts/fusion-ranking.sh
#
# Then: python3 scripts/patch-tables.py $OUT [OLD] (its last tables compare criterion and truth).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

BIN=${BIN:-target/release/edge-inspect}
OUT=${OUT:-bench-lofo}
THREADS=${THREADS:-2}

run_eval() { # report model data [flags]
  local report=$1 model=$2 data=$3
  shift 3
  [ -f "$report/report.json" ] && return 0
  echo "[$(date -u +%H:%M:%S)] eval $report"
  # A bundle whose search chose weight 1 ships the patch rule and no standardisation to
  # re-weight: its eval refuses, and the tables mark the weights as not scored.
  "$BIN" eval --model "$model" --data "$data" --out "$report" --overlays 0 --no-progress \
    --threads "$THREADS" "$@" >/dev/null 2>>"$OUT/ranking.log" || echo "  refused: see $OUT/ranking.log"
}

for model in "$OUT"/models/fused/*/; do
  name=$(basename "$model")
  data="$OUT/data/${name%-*}"
  for weight in 0.25 0.5 0.75; do
    run_eval "$OUT/eval/w$weight/$name" "$model" "$data" --fusion-weight "$weight"
  done
  # The best single-reconstruction pixel candidate: t0 steps condition rule.
  read -r t0 steps condition rule < <(python3 - "$model/manifest.toml" <<'PY'
import sys, tomllib
point = tomllib.load(open(sys.argv[1], "rb"))["operating_point"]
best = next(c for c in point["candidates"] if c["residual"] in ("l1", "ssim", "msgms") and not c.get("extra_t0"))
print(best["t0"], best["steps"], best["condition"], best["residual"])
PY
)
  run_eval "$OUT/eval/pixel/$name" "$model" "$data" --anomaly-map "$rule" --t0 "$t0" --steps "$steps" \
    --condition "$condition" --no-ensemble --no-fusion
done

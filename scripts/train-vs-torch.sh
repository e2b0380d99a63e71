#!/usr/bin/env bash
# `retrain`'s loop against its own `train_step` bench and against PyTorch, alternated in one
# run so that all three see the same machine (docs/performance.md, issue 24 item 6). Needs a
# release build (`cargo build --release --bin edge-inspect && cargo bench --no-run --bench
# train_step`) and a Python with torch, onnx, onnxruntime, numpy and Pillow (PYTHON).
#
#   PYTHON=/path/to/venv/bin/python ROUNDS=2 STEPS=60 scripts/train-vs-torch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)" >/dev/null
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-60}
bench=$(find target/release/deps -name 'train_step-*' -type f -executable | head -1)
[ -n "$bench" ] || { echo "no release train_step bench: cargo bench --no-run --bench train_step" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for round in $(seq "$ROUNDS"); do
  echo "== round $round, $(date -u +%FT%TZ)"
  RAYON_NUM_THREADS=2 BENCH_STEPS=20 "$bench" | tail -1 | sed 's/^/train_step bench, libgomp default: /'
  OMP_WAIT_POLICY=passive RAYON_NUM_THREADS=2 BENCH_STEPS=20 "$bench" | tail -1 |
    sed 's/^/train_step bench, passive (as retrain): /'
  rm -rf "$work/m" "$work/m.report.json"
  RAYON_NUM_THREADS=2 target/release/edge-inspect retrain --data data/brick --steps "$STEPS" --batch-size 16 \
    --threads 2 --fixed-operating-point --out "$work/m" > "$work/retrain.log" 2>&1
  python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
print('retrain loop: %.3f s per step, phases %s' % (r['seconds_per_step'], {k: round(v, 4) for k, v in r['step_phases'].items()}))
" "$work/m.report.json"
  "$PYTHON" scripts/torch_reference.py models/brick-huber --threads 2 --batch 16 --steps "$STEPS" --loop data/brick | tail -2
done

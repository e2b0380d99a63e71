#!/usr/bin/env bash
# Trigger → verdict latency per part (docs/performance.md, issue 25): a Mosquitto broker and
# the daemon with one MQTT-triggered replay camera; PARTS triggers are sent INTERVAL_MS apart
# with mosquitto_pub, and the verdicts' `latency_ms` (the daemon's own figure: from the
# trigger's arrival to the verdict's publication, the same span as /metrics'
# edge_inspect_trigger_to_verdict_seconds) is summarised as p50 / p90 / p99 / max.
#
#   scripts/trigger-latency.sh MODEL FRAMES_GLOB
#   PARTS=200 INTERVAL_MS=500 scripts/trigger-latency.sh models/brick-huber 'data/brick/test/*/*.png'
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
BIN=${BIN:-target/release/edge-inspect}
PARTS=${PARTS:-200}
INTERVAL_MS=${INTERVAL_MS:-500}
THREADS=${THREADS:-2}
[ $# -eq 2 ] || { echo "usage: $0 MODEL FRAMES_GLOB" >&2; exit 2; }
model=$(realpath "$1")
frames=$2
case $frames in /*) ;; *) frames=$PWD/$frames ;; esac
work=$(mktemp -d)
broker= daemon= sub=
cleanup() {
  for pid in $sub $daemon $broker; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/broker.log" 2>&1 &
broker=$!
for _ in $(seq 100); do # until the broker listens
  mosquitto_pub -p "$port" -t probe -n 2>/dev/null && break
  sleep 0.1
done
cat > "$work/config.toml" <<EOF
[node]
id = "latency"
state_dir = "$work/state"
[model]
path = "$model"
[runtime]
providers = ["cpu"]
intra_threads = $THREADS
[pipeline]
max_batch = 1
max_wait_ms = 1
[http]
enabled = false
[mqtt]
host = "127.0.0.1"
port = $port
publish_images = false
[recorder]
enabled = false
[[cameras]]
id = "line"
source = "replay"
path = "$frames"
loop = true
trigger = "mqtt"
EOF
topic=edge-inspect/latency
# One subscription for the daemon's retained `available` and the verdicts: once `online` has
# arrived, the verdict topic is subscribed too (both are in the one SUBSCRIBE).
mosquitto_sub -p "$port" -q 1 -v -t "$topic/available" -t "$topic/line/verdict" -C $((PARTS + 1)) \
  -W $((PARTS * INTERVAL_MS / 1000 + 240)) > "$work/messages" &
sub=$!
"$BIN" run --config "$work/config.toml" > "$work/daemon.log" 2>&1 &
daemon=$!
until grep -q "^$topic/available online" "$work/messages"; do
  kill -0 "$sub" 2>/dev/null || { echo "the daemon did not come online:" >&2; cat "$work/daemon.log" >&2; exit 1; }
  sleep 0.1
done
interval=$(python3 -c "print($INTERVAL_MS / 1000)")
for i in $(seq 1 "$PARTS"); do
  mosquitto_pub -p "$port" -q 1 -t "$topic/line/trigger" -m "P-$i"
  sleep "$interval"
done
wait "$sub"
sub=
grep "^$topic/line/verdict " "$work/messages" | cut -d' ' -f2- > "$work/verdicts.jsonl"
python3 - "$work/verdicts.jsonl" "$PARTS" "$INTERVAL_MS" <<'PY'
import json, statistics, sys
verdicts = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
parts, interval = int(sys.argv[2]), sys.argv[3]
kinds = {k: sum(v["verdict"] == k for v in verdicts) for k in ("pass", "fail", "missed")}
ms = sorted(v["latency_ms"] for v in verdicts if v["verdict"] != "missed")
q = lambda p: ms[min(len(ms) - 1, int(round(p * (len(ms) - 1))))]
print(f"| parts | every | pass / fail / missed | p50 ms | p90 ms | p99 ms | max ms |")
print(f"|---|---|---|---|---|---|---|")
print(f"| {parts} | {interval} ms | {kinds['pass']} / {kinds['fail']} / {kinds['missed']} "
      f"| {q(0.5):.1f} | {q(0.9):.1f} | {q(0.99):.1f} | {ms[-1]:.1f} |")
assert len(verdicts) == parts, f"{len(verdicts)} verdicts for {parts} triggers"
PY

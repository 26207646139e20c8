#!/usr/bin/env bash
# A FedMER simulation on a two-node Ray cluster: two raylets on this machine (one CPU each)
# stand in for two hosts. On real hosts run the first `ray start` on the head and the second on
# every other host (with FedMER installed there too), then set RAY_ADDRESS where you launch.
# Prints which raylet each ClientApp actor ran under, and stops the cluster on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PORT=${RAY_PORT:-6390}
OUT=${OUT:-/tmp/fedmer-ray-cluster}
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --port "$PORT" --num-cpus 1 --include-dashboard false --disable-usage-stats >/dev/null
ray start --address "127.0.0.1:$PORT" --num-cpus 1 --disable-usage-stats >/dev/null
sleep 3
ray status --address "127.0.0.1:$PORT" | sed -n '/Active:/,/Pending:/p'
rm -rf "$OUT" "$OUT.actors"
# which raylet (node) each ClientApp actor runs under, sampled while the run goes on
( while sleep 1; do ps -eo pid=,ppid=,cmd= | awk '$3 ~ /^ray::ClientAppActor/ {print $1, $2}'; done >> "$OUT.actors" ) &
WATCH=$!
trap 'kill $WATCH 2>/dev/null || true; ray stop --force >/dev/null 2>&1 || true' EXIT
time RAY_ADDRESS="127.0.0.1:$PORT" python -m simulations.run +experiment=smoke "hydra.run.dir=$OUT" "$@" 2>&1 \
  | tee "$OUT.log" | grep -E "attaching|final held-out"
echo "ClientApp actor pid -> raylet pid (one raylet per Ray node):"
sort -u "$OUT.actors" | sed 's/^/  /'

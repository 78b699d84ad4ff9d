#!/usr/bin/env bash
cd /work/main
export PATH=/work/main/.venv/bin:$PATH
for r in 1 2; do
  echo "=== round $r default $(uptime)"
  SERVERS="llmslim" CLIENTS=16,64 MAX_BATCH=64 OUT=serve/results/session23_chunk/round$r/default serve/bench_serving.sh
  echo "=== round $r --prefill-chunk 4096 $(uptime)"
  LLMSLIM_ARGS="--prefill-chunk 4096" SERVERS="llmslim" CLIENTS=16,64 MAX_BATCH=64 OUT=serve/results/session23_chunk/round$r/chunk4096 serve/bench_serving.sh
done
echo "=== end $(uptime)"

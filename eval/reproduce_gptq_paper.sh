#!/usr/bin/env bash
# Reproduce the GPTQ paper's OPT-125M WikiText-2 perplexities (Frantar et al. 2022, Table 3):
#   FP16 27.65 | RTN 4-bit 37.28 | GPTQ 4-bit 31.12 | GPTQ 3-bit 53.85
# Paper setup: 128 random 2048-token windows of C4 (seed 0) for calibration; per-channel
# (no groups), asymmetric min-max grid, no act-order, layers in one step (true-sequential came
# later, for LLaMA); perplexity over non-overlapping 2048-token windows of the WikiText-2 test
# split joined with "\n\n", the tail that does not fill a window dropped.
# Needs the Hugging Face hub (model and datasets); it cannot run on an offline machine.
# Its pieces are tested offline in tests/test_paper_recipe.py.
set -euo pipefail
OUT=${OUT:-out/gptq-paper}
MODEL=${MODEL:-facebook/opt-125m}
mkdir -p "$OUT"
common=(--method gptq --group-size -1 --asym --no-true-sequential --no-act-group-aware
        --calib c4 --nsamples 128 --seqlen 2048 --seed 0 --damp-percent 0.01 --force)
llmslim eval "$MODEL" --ppl wikitext2 --ppl-method gptq --seqlen 2048 --output "$OUT/fp.json"
llmslim quantize "$MODEL" --method rtn --bits 4 --group-size -1 --asym --out "$OUT/rtn4" --force
llmslim eval "$OUT/rtn4" --ppl wikitext2 --ppl-method gptq --seqlen 2048 --output "$OUT/rtn4.json"
for bits in 4 3; do
  llmslim quantize "$MODEL" "${common[@]}" --bits $bits --out "$OUT/gptq$bits"
  llmslim eval "$OUT/gptq$bits" --ppl wikitext2 --ppl-method gptq --seqlen 2048 --output "$OUT/gptq$bits.json"
done
llmslim compare "$OUT"/fp.json "$OUT"/rtn4.json "$OUT"/gptq4.json "$OUT"/gptq3.json --output "$OUT/table.md"
echo "expected (paper): fp16 27.65, RTN 4-bit 37.28, GPTQ 4-bit 31.12, GPTQ 3-bit 53.85"

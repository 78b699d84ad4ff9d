#!/usr/bin/env bash
# Quantize the reference model with llmslim in every variant the consumer-compatibility check covers.
# usage: bash eval/peers/make_variants.sh OUTROOT   (run in the llmslim venv)
# GPTQ where the format differs (act-order g_idx); RTN writes the very same tensors otherwise
# (packing, qzeros, scales), so it covers bit widths / asym / per-channel quickly.
set -u
root=${1:-/tmp/peers/ckpt}
mkdir -p "$root"
export HF_HUB_OFFLINE=1
q() { name=$1; shift
  [ -f "$root/$name/config.json" ] && { echo "skip $name"; return; }
  /usr/bin/time -f "$name %e s %M KB" llmslim quantize smollm2-135m --nsamples 16 --seqlen 256 --out "$root/$name" --force "$@" \
    > "$root/$name.log" 2>&1 || echo "FAILED $name"; tail -1 "$root/$name.log"; echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"; }
q rtn4_g128_sym           --method rtn  --bits 4 --group-size 128
q rtn4_g128_asym          --method rtn  --bits 4 --group-size 128 --asym
q rtn3_g128_sym           --method rtn  --bits 3 --group-size 128
q rtn3_g128_asym          --method rtn  --bits 3 --group-size 128 --asym
q rtn8_g128_sym           --method rtn  --bits 8 --group-size 128
q rtn8_g32_asym           --method rtn  --bits 8 --group-size 32 --asym
q rtn2_g64_asym           --method rtn  --bits 2 --group-size 64 --asym
q rtn4_pc_sym             --method rtn  --bits 4 --group-size -1
q gptq4_g128_sym          --method gptq --bits 4 --group-size 128
q gptq4_g128_descact      --method gptq --bits 4 --group-size 128 --desc-act
q gptq3_g128_asym_descact --method gptq --bits 3 --group-size 128 --asym --desc-act
q gptq4_g128_asym         --method gptq --bits 4 --group-size 128 --asym
q gptq8_g128_sym          --method gptq --bits 8 --group-size 128
echo ALLDONE

"""One llm-compressor 0.14 pruning run, in llm-compressor's own venv (no llmslim import beyond
``llmslim.util``, which is stdlib only). Called by eval/bench_prune.py; prints one JSON line.

    .venvs/llmcompressor/bin/python eval/peers/llmcompressor_prune.py --model FP32_FOLDER \
        --calib eval/results/prune_table.calib.pt --row sparsegpt-2of4 --out /tmp/lc-out

Rows: sparsegpt|wanda-50|2of4, sparsegpt-2of4+gptq4g64 (SparseGPTModifier then GPTQModifier W4 group 64:
its GPTQ preset refuses group 128 on SmolLM2). The calibration tensor is the one every llmslim row
uses, as a local ``datasets.Dataset``; the pruned model is saved dense (compressed-tensors 0.19 no
longer writes sparse compression) for llmslim to score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llmslim.util import peak_rss_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--row", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = torch.load(args.calib)
    ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    prune, *rest = args.row.split("+")
    method, pattern = prune.split("-")
    kw = dict(sparsity=0.5, mask_structure="2:4" if pattern == "2of4" else "0:0", targets=["Linear"],
              ignore=["re:.*lm_head"])
    recipe = [SparseGPTModifier(**kw) if method == "sparsegpt" else WandaPruningModifier(**kw)]
    if rest:
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe.append(GPTQModifier(targets=["Linear"], ignore=["re:.*lm_head"], config_groups={"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                               "group_size": 64}}}))
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=tokens.shape[0],
            max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - t0
    rss = peak_rss_bytes()
    if rest:  # fake-quantized weights, saved dense like the pruned ones: llmslim scores the same numbers
        for m in model.modules():
            if hasattr(m, "weight_scale") and hasattr(m, "weight"):
                from compressed_tensors.quantization.lifecycle.forward import forward_quantize

                m.weight.data = forward_quantize(m, m.weight, "weight", m.quantization_scheme.weights)
    # Saved through a fresh float copy of the model: the weights (pruned, and fake-quantized) without
    # llm-compressor's quantization parameters and config, which would make the folder a
    # compressed-tensors checkpoint that llmslim's loader (rightly) refuses to read as float.
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    state = model.state_dict()
    plain.load_state_dict({k: state[k] for k in plain.state_dict()})
    plain.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    import llmcompressor

    print(json.dumps({"seconds": seconds, "peak_rss": rss, "tool": f"llmcompressor {llmcompressor.__version__}"}))


if __name__ == "__main__":
    main()

"""Load llmslim's GPTQ checkpoints with independent consumers and compare with llmslim's logits.

Run in the GPTQModel 7.7.0 venv (not the llmslim one), after eval/peers/llmslim_logits.py:

    GPTQMODEL_CPU_WORKERS=2 HF_HUB_OFFLINE=1 python eval/peers/consumer_check.py LOGITS.pt \
        [--consumers gptqmodel,transformers] [--json OUT.json]

Consumers:
  gptqmodel     gptqmodel.GPTQModel.load(dir, backend=BACKEND.TORCH, dtype=float16) (it refuses float32)
  transformers  transformers.AutoModelForCausalLM.from_pretrained(dir, dtype=float32) (optimum+gptqmodel),
                with quantization_config backend "torch" (the default CPU kernel needs in % group == 0)
Per checkpoint: max |Δlogit|, max |Δlogit| / max |logit|, argmax agreement of every position, and
(gptqmodel only) the largest per-layer difference between GPTQModel's dequantize_weight() and the
weight llmslim's unpacking of the same tensors gives (llmslim/pack.py, imported from the
repo: it needs only torch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# GPTQModel's TorchLinear torch.compile()s its dequantization on load: minutes of recompiles per
# layer shape on 2 cores, same numbers. Eager mode.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def llmslim_weight(tensors: dict, name: str, bits: int, group_size: int) -> torch.Tensor:
    """[out, in] fp32 weight exactly as llmslim's GPTQLinear dequantizes these tensors."""
    sys.path.insert(0, str(REPO))
    from llmslim.nn import GPTQLinear  # imports only torch and llmslim.pack

    out_f, in_f = tensors[f"{name}.scales"].shape[1], tensors[f"{name}.g_idx"].shape[0]
    m = GPTQLinear(in_f, out_f, bits, group_size, bias=False)
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(m, k).copy_(tensors[f"{name}.{k}"])
    return m.dequantized_weight(torch.float32)


def compare(ref: dict, logits: list[torch.Tensor]) -> dict:
    dmax, rel, agree, n = 0.0, 0.0, 0, 0
    for a, b in zip(ref["logits"], logits, strict=True):
        b = b.float()
        d = (a - b).abs().max().item()
        dmax = max(dmax, d)
        rel = max(rel, d / a.abs().max().item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"max_abs": dmax, "max_rel": rel, "argmax_agree": f"{agree}/{n}"}


@torch.no_grad()
def run_logits(model, ref) -> list[torch.Tensor]:
    return [model(input_ids=x).logits[0].float() for x in ref["input_ids"]]


def via_gptqmodel(ckpt: str, ref: dict) -> dict:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from safetensors.torch import load_file

    # TorchLinear accepts only fp16/bf16 here ("only supports [float16, bfloat16]" for float32).
    model = GPTQModel.load(ckpt, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    res = compare(ref, run_logits(model, ref))
    inner = getattr(model, "model", model)
    tensors = {}
    for f in Path(ckpt).glob("*.safetensors"):
        tensors.update(load_file(f))
    worst, worst_name, worst_steps, kernels = 0.0, None, 0.0, set()
    for name, m in inner.named_modules():
        if isinstance(m, BaseQuantLinear):
            kernels.add(type(m).__name__)
            w_theirs = m.dequantize_weight().float()  # [in, out], in the module's dtype (fp16)
            w_theirs = w_theirs.T if w_theirs.shape[0] == m.in_features else w_theirs
            w_ours = llmslim_weight(tensors, name, m.bits, m.group_size)
            diff = (w_theirs[: w_ours.shape[0], : w_ours.shape[1]] - w_ours).abs()
            # In units of the quantization step of each weight: a misread code or zero shows as >= 1,
            # fp16 rounding of the consumer's dequantization as << 1.
            step = tensors[f"{name}.scales"].float()[tensors[f"{name}.g_idx"].long()].T
            steps = (diff / step.clamp_min(1e-12)).max().item()
            if diff.max().item() >= worst:
                worst, worst_name = diff.max().item(), name
            worst_steps = max(worst_steps, steps)
    res.update(weight_max_abs=worst, weight_worst_layer=worst_name, weight_max_steps=worst_steps,
               kernels=sorted(kernels))
    return res


def via_transformers(ckpt: str, ref: dict) -> dict:
    from transformers import AutoModelForCausalLM, GPTQConfig

    qc = json.loads((Path(ckpt) / "config.json").read_text())["quantization_config"]
    kw = {}
    try:
        kw["quantization_config"] = GPTQConfig(bits=qc["bits"], backend="torch")
    except TypeError:
        pass
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, device_map="cpu", **kw)
    res = compare(ref, run_logits(model, ref))
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    res["kernels"] = sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logits")
    ap.add_argument("--consumers", default="gptqmodel,transformers")
    ap.add_argument("--only", default=None, help="comma-separated checkpoint names")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    refs = torch.load(args.logits)
    out = {}
    for name, ref in refs.items():
        if args.only and name not in args.only.split(","):
            continue
        for consumer in args.consumers.split(","):
            t0 = time.time()
            try:
                fn = via_gptqmodel if consumer == "gptqmodel" else via_transformers
                res = fn(ref["dir"], ref)
                res["ok"] = True
            except Exception as e:  # report and go on: a failing load is a result
                res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                traceback.print_exc()
            res["seconds"] = round(time.time() - t0, 1)
            out[f"{name}|{consumer}"] = res
            print(f"RESULT {name} {consumer} {json.dumps(res)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

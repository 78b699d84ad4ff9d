"""A quick look at GPTQ's importance-weighted scale search on real layers (minutes, not the hour of a
whole-model run): the float reference model's first blocks, each linear's Hessian from calibration
windows of the built-in wiki corpus (float inputs, not the sequential ones), then GPTQ on each linear
with every ``importance`` (``gptq_quantize``) and target; the layer objective ||(W - Q) X||^2 / n
summed over the linears, and the solver's process CPU seconds. Perplexity needs the whole model:
eval/grid_importance.py.

    python eval/grid_importance_layers.py --blocks 3 --nsamples 32 --out eval/results/grid_importance_layers.json
"""

import argparse
import json
import time

import torch

from llmslim.data import calibration_tokens
from llmslim.loader import load
from llmslim.quant.gptq import accumulate_hessian, gptq_quantize, layer_loss

TARGETS = {"q4_0": dict(bits=4, group_size=32, grid="q4_0"), "4bit-g128": dict(bits=4, group_size=128),
           "3bit-g128": dict(bits=3, group_size=128)}


class Enough(Exception):
    pass


def hessians(model, tokens: torch.Tensor, blocks: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    stats, hooks = {}, []
    layers = model.model.layers
    for b in range(blocks):
        for name, mod in layers[b].named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{b}.{name}"
                stats[key] = [torch.zeros(mod.in_features, mod.in_features), 0, mod.weight]

                def hook(_m, inp, _out, key=key):
                    s = stats[key]
                    s[0], s[1] = accumulate_hessian(s[0], s[1], inp[0].detach())
                hooks.append(mod.register_forward_hook(hook))

    def stop(*_):
        raise Enough
    hooks.append(layers[blocks].register_forward_pre_hook(stop))
    with torch.no_grad():
        for row in tokens.split(8):
            try:
                model(row)
            except Enough:
                pass
    for h in hooks:
        h.remove()
    return {k: (w.detach().float().clone(), H) for k, (H, _, w) in stats.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load(args.model)
    layers = hessians(model, calibration_tokens("wiki", tok, args.nsamples, args.seqlen), args.blocks)
    result = {"args": vars(args), "rows": []}
    for target in args.targets:
        for importance in (None, "hessian", "imatrix"):
            cpu, total, per = time.process_time(), 0.0, {}
            for key, (W, H) in layers.items():
                r = gptq_quantize(W, H, sym=True, mse=True, act_group_aware=True, importance=importance,
                                  **TARGETS[target])
                per[key] = layer_loss(W, r.dequantize(), H)
                total += per[key]
            row = {"target": target, "importance": importance, "loss": total,
                   "cpu_s": round(time.process_time() - cpu, 2), "per_layer": per}
            result["rows"].append(row)
            print(target, importance, f"loss {total:.4f}", f"cpu {row['cpu_s']} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

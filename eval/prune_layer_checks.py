"""Layer-level checks behind eval/pruning.md, on real Hessians of the reference model.

1. ``order``: SparseGPT in act-order against the reference's left-to-right sweep, at 2:4 (runs of 4
   moved whole, ``sparsegpt_prune(act_order=True)``) and at 50% unstructured (columns by decreasing
   Hessian diagonal, permuted by hand), on every linear of a few blocks: the layer objective
   ||WX - ŴX||^2 / n of each, and their ratio.
2. ``peer`` (with ``--llmcompressor-python``): llmslim's ``sparsegpt_prune`` and llm-compressor's
   ``sparsify_weight`` on the same W and H (block 0, where both tools see the same inputs): how many
   mask entries agree, and each one's layer objective.

Calibration: the first ``--nsamples`` of the benchmark's 128 x 512 wiki windows (seed 0), fp32
forwards of the unpruned model; H = 2XX^T/n per linear, as the block driver accumulates it.

    python eval/prune_layer_checks.py --blocks 2 15 27 --out eval/results/prune/layer_checks.json \\
        --llmcompressor-python .venvs/llmcompressor/bin/python
    python eval/prune_layer_checks.py --refit --blocks 2 15 27 --out eval/results/prune/refit_layer_checks.json

3. ``--refit``: SparseGPT's and Wanda's 50% masks with the kept weights refit exactly
   (``quant.refit.refit_kept``, 0-100 CG iterations), the layer objective on the calibration H and
   on a held-out H (the next ``--nsamples`` windows), as ratios to SparseGPT's sweep alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# Run in llm-compressor's venv: its solver on the saved W and H, the pruned W back.
PEER = """
import sys, torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
d = torch.load(sys.argv[1])
out = {}
for name, (W, H) in d.items():
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    out[name] = sparsify_weight(lin, {lin: H.clone()}, 0.5, 0, 0, 128, 0.01, False)[1].float()
torch.save(out, sys.argv[2])
"""


def hessians(blocks: list[int], nsamples: int, start: int = 0) -> dict:
    import torch

    from llmslim.data import calibration_tokens
    from llmslim.formats.hf import load_hf, load_tokenizer
    from llmslim.models import resolve
    from llmslim.quant.gptq import accumulate_hessian
    from llmslim.quant.walk import find_blocks, find_linears

    folder = resolve("smollm2-135m")
    model, tok = load_hf(folder, torch.float32).eval(), load_tokenizer(folder)
    calib = calibration_tokens("wiki", tok, 128, 512, seed=0)[start:start + nsamples]
    _, found = find_blocks(model)
    lins = {f"{b}.{n}": lin for b in blocks for n, lin in find_linears(found[b]).items()}
    H = {k: [torch.zeros(lin.in_features, lin.in_features), 0] for k, lin in lins.items()}

    def hook(key):
        def f(module, args, output):
            H[key][0], H[key][1] = accumulate_hessian(H[key][0], H[key][1], args[0].detach())
        return f

    handles = [lin.register_forward_hook(hook(k)) for k, lin in lins.items()]
    with torch.inference_mode():
        for i in range(0, len(calib), 8):
            model(calib[i:i + 8], use_cache=False)
    for h in handles:
        h.remove()
    return {k: (lins[k].weight.detach().float().clone(), H[k][0]) for k in lins}


def order_rows(layers: dict) -> list[dict]:
    import torch

    from llmslim.quant.gptq import layer_loss
    from llmslim.quant.sparsegpt import sparsegpt_prune

    rows = []
    for name, (W, H) in layers.items():
        natural = layer_loss(W, sparsegpt_prune(W, H, nm=(2, 4)).W, H)
        ordered = layer_loss(W, sparsegpt_prune(W, H, nm=(2, 4), act_order=True).W, H)
        perm = torch.argsort(torch.diag(H), descending=True)
        inv = torch.argsort(perm)
        u_nat = layer_loss(W, sparsegpt_prune(W, H, 0.5).W, H)
        u_ord = layer_loss(W, sparsegpt_prune(W[:, perm], H[perm][:, perm], 0.5).W[:, inv], H)
        rows.append({"layer": name, "nm_natural": natural, "nm_act_order": ordered, "nm_ratio": ordered / natural,
                     "unstructured_natural": u_nat, "unstructured_desc": u_ord, "unstructured_ratio": u_ord / u_nat})
        print(f"{name}: 2:4 act-order / natural {ordered / natural:.4f}, 50% desc / natural {u_ord / u_nat:.4f}",
              flush=True)
    return rows


def peer_rows(layers: dict, python: str) -> list[dict]:
    import torch

    from llmslim.quant.gptq import layer_loss
    from llmslim.quant.sparsegpt import sparsegpt_prune

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.pt", Path(d) / "out.pt"
        torch.save(layers, src)
        subprocess.run([python, "-c", PEER, str(src), str(dst)], check=True, capture_output=True)
        theirs = torch.load(dst)
    rows = []
    for name, (W, H) in layers.items():
        ours = sparsegpt_prune(W, H, 0.5)
        agree = float(((theirs[name] == 0) == ours.mask).float().mean())
        rows.append({"layer": name, "mask_agreement": agree, "loss_llmslim": layer_loss(W, ours.W, H),
                     "loss_llmcompressor": layer_loss(W, theirs[name], H)})
        print(f"{name}: masks agree on {agree:.5%}; layer objective llmslim {rows[-1]['loss_llmslim']:.6g}, "
              f"llm-compressor {rows[-1]['loss_llmcompressor']:.6g}", flush=True)
    return rows


def refit_rows(layers: dict, held: dict) -> list[dict]:
    """SparseGPT's and Wanda's masks with the kept weights refit (``refit_kept``) by 0-100 CG
    iterations: the layer objective on the calibration H and on a held-out H from other windows,
    each as a ratio to SparseGPT's sweep alone."""
    from llmslim.quant.gptq import layer_loss
    from llmslim.quant.refit import refit_kept
    from llmslim.quant.sparsegpt import sparsegpt_prune
    from llmslim.quant.wanda import wanda_prune

    rows = []
    for name, (W, H) in layers.items():
        H2 = held[name][1]
        base = {"sparsegpt": sparsegpt_prune(W, H, 0.5), "wanda": wanda_prune(W, H.diagonal(), 0.5)}
        ref_cal, ref_held = layer_loss(W, base["sparsegpt"].W, H), layer_loss(W, base["sparsegpt"].W, H2)
        row = {"layer": name}
        for method, r in base.items():
            for iters in (0, 10, 20, 30, 100):
                Q = refit_kept(W, r.W, H, r.mask, iters)
                row[f"{method}_refit{iters}"] = {"calibration": layer_loss(W, Q, H) / ref_cal,
                                                 "held_out": layer_loss(W, Q, H2) / ref_held}
        rows.append(row)
        print(name, {k: round(v["held_out"], 4) for k, v in row.items() if k != "layer"}, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", nargs="+", type=int, default=[2, 15, 27])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--llmcompressor-python", help="python of llm-compressor's venv (for the peer check)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "prune" / "layer_checks.json")
    p.add_argument("--refit", action="store_true", help="the refit check only (held-out H from the next --nsamples windows)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    layers = hessians(args.blocks, args.nsamples)
    if args.refit:
        rows = refit_rows(layers, hessians(args.blocks, args.nsamples, start=args.nsamples))
        keys = [k for k in rows[0] if k != "layer"]
        summary = {k: {part: statistics.mean(r[k][part] for r in rows) for part in ("calibration", "held_out")}
                   for k in keys}
        for k, v in summary.items():
            print(f"{k}: layer objective / SparseGPT's sweep, mean: calibration {v['calibration']:.4f}, "
                  f"held-out {v['held_out']:.4f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"blocks": args.blocks, "nsamples": args.nsamples, "seqlen": 512,
                                        "mean": summary, "layers": rows}, indent=1))
        return
    rows = order_rows(layers)
    result = {"blocks": args.blocks, "nsamples": args.nsamples, "seqlen": 512, "order": rows,
              "nm_ratio_mean": statistics.mean(r["nm_ratio"] for r in rows),
              "nm_ratio_max": max(r["nm_ratio"] for r in rows),
              "unstructured_ratio_mean": statistics.mean(r["unstructured_ratio"] for r in rows)}
    if args.llmcompressor_python:
        result["peer_block0"] = peer_rows(hessians([0], args.nsamples), args.llmcompressor_python)
    print(f"2:4 act-order / natural: mean {result['nm_ratio_mean']:.4f}, max {result['nm_ratio_max']:.4f}; "
          f"50% desc / natural: mean {result['unstructured_ratio_mean']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""What the output head's format costs (issue 16): bf16 vs 8-bit blocks of 32 (``runtime.head``).

The head alone, isolated from the rest of the fast path: the model's last hidden states over
held-out wiki windows (fp32 forward), rounded to bf16 as the fast path hands them to the head,
then multiplied by each head format; mean KL(fp32 head on fp32 states || format) per position.
Three heads: the model's own (SmolLM2's came from a GGUF whose token_embd is Q8_0, so blocks of 32
reproduce it exactly), and two generic ones that are not on any 8-bit grid (the same head plus
uniform noise of one Q8 step; a Gaussian matrix of the same std), to see what a head from
another model would lose.

    python eval/head_quality.py --json eval/results/head_quality_session23.json   # ~1 min
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from llmslim.data import eval_text
from llmslim.loader import load
from llmslim.runtime.head import BLOCK, Q8Linear, dequantize_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/smollm2-gptq-4bit-g64")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load(args.model)
    ids = tok(eval_text("wiki"), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        h = torch.cat([model(torch.tensor([ids[i * args.window:(i + 1) * args.window]]), output_hidden_states=True)
                       .hidden_states[-1][0].float() for i in range(args.windows)])
    hb = h.bfloat16().float()
    W0 = model.lm_head.weight.detach().float()
    blocks = W0.view(W0.shape[0], -1, BLOCK)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    heads = {
        "the model's own head": W0,
        "generic: own head + uniform noise of one 8-bit step": (blocks + (torch.rand_like(blocks) - 0.5) * step).view_as(W0),
        "generic: Gaussian, the own head's std": torch.randn_like(W0) * W0.std(),
    }
    report = {"model": args.model, "positions": h.shape[0], "heads": {}}
    for name, W in heads.items():
        ref = F.log_softmax(h @ W.T, -1)

        def kl(logits: torch.Tensor, ref: torch.Tensor = ref) -> float:
            return F.kl_div(F.log_softmax(logits.float(), -1), ref, log_target=True, reduction="batchmean").item()

        q = Q8Linear(W)
        Wq = dequantize_rows(q.codes, q.scales, torch.arange(W.shape[0]))
        Wb = W.bfloat16().float()
        rows = {"bf16 head, bf16 logits (the fast path's head before session 23)": kl((hb @ Wb.T).bfloat16()),
                "bf16 head, fp32 logits": kl(hb @ Wb.T),
                "8-bit blocks of 32, fp32 logits (head='int8')": kl(hb @ Wq.T),
                "fp32 head (only the states rounded to bf16)": kl(hb @ W.T)}
        report["heads"][name] = rows
        print(name)
        for k, v in rows.items():
            print(f"   {k:66s} KL {v:.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

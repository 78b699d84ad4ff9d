"""What bf16 compute costs a float model (issue 16): the fast path against its float32 reference.

The default fast path (``llmslim serve``, ``accelerate``) computes in bf16. On a float model that
changes some greedy continuations from the first token. This measures by how much, against the
float32 forward of the same model, and next to the noise floor -- transformers' own forward of the
same model merely computed in bf16:

- mean KL(fp32 || path) of the next-token distributions, over every position of held-out wiki
  windows, each path decoding the window one token at a time as it serves (the lean paths) or in
  one forward (transformers);
- top-1 agreement at those positions;
- greedy continuations of held-out prompts: how many equal fp32's, from the first token and in full.

    python eval/bf16_quality.py --out eval/results/bf16_quality.json     # ~10 min on one core
    python eval/bf16_quality.py --smoke                                   # a tiny run, to see it works

No timings: speed is bench_inference.py's job.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

from llmslim.data import eval_text
from llmslim.loader import load
from llmslim.runtime.fast import accelerate
from llmslim.runtime.generate import Stepper, generate


def window_logits(model, ids: list[int], stepwise: bool) -> torch.Tensor:
    """Next-token logits after every position of ``ids``: stepwise through llmslim's decode loop
    (the lean forward, one token at a time), or one transformers forward."""
    with torch.inference_mode():
        if not stepwise:
            return model(torch.tensor([ids])).logits[0].float()
        step = Stepper(model, len(ids))
        assert step.lean is not None, "the fast path must run on the lean forward"
        return torch.stack([step([t]) for t in ids]).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="2 windows of 32, 3 prompts of 8 tokens")
    args = p.parse_args()
    if args.smoke:
        args.windows, args.window, args.prompts, args.prompt_tokens, args.tokens = 2, 32, 3, 16, 8
    torch.manual_seed(0)
    model, tok = load(args.model)
    ids = tok(eval_text("wiki"), add_special_tokens=False)["input_ids"]
    # windows from the front of the held-out text, prompts from further on: never the same tokens
    windows = [ids[i * args.window:(i + 1) * args.window] for i in range(args.windows)]
    start = args.windows * args.window
    prompts = [ids[start + i * 1000:start + i * 1000 + args.prompt_tokens] for i in range(args.prompts)]

    paths = {
        "transformers bf16 (noise floor)": (copy.deepcopy(model).to(torch.bfloat16), False),
        "fast path bf16 (default)": (accelerate(copy.deepcopy(model), torch.bfloat16), True),
        "fast path fp32 (accelerate(model, torch.float32))": (accelerate(copy.deepcopy(model), torch.float32), True),
    }
    ref = [F.log_softmax(window_logits(model, w, False), -1) for w in windows]
    ref_greedy = [generate(model, tok, q, max_new_tokens=args.tokens, ignore_eos=True).tokens for q in prompts]
    report = {"model": args.model, "windows": args.windows, "window": args.window, "prompts": args.prompts,
              "prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "paths": {}}
    for name, (m, stepwise) in paths.items():
        kl, top1, n = 0.0, 0, 0
        for w, r in zip(windows, ref, strict=True):
            lp = F.log_softmax(window_logits(m, w, stepwise), -1)
            kl += F.kl_div(lp, r, log_target=True, reduction="sum").item()
            top1 += int((lp.argmax(-1) == r.argmax(-1)).sum())
            n += len(w)
        got = [generate(m, tok, q, max_new_tokens=args.tokens, ignore_eos=True).tokens for q in prompts]
        first = sum(g[0] == r[0] for g, r in zip(got, ref_greedy, strict=True))
        full = sum(g == r for g, r in zip(got, ref_greedy, strict=True))
        prefix = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(r))
                  for g, r in zip(got, ref_greedy, strict=True)]
        report["paths"][name] = {"mean_kl": kl / n, "top1_agreement": top1 / n, "first_token_equal": first,
                                 "continuations_equal": full, "mean_common_prefix": sum(prefix) / len(prefix)}
        print(f"{name:52s} KL {kl / n:.2e}  top-1 {top1 / n:.4f}  first token {first}/{len(prompts)}  "
              f"whole {full}/{len(prompts)}  mean prefix {sum(prefix) / len(prefix):.1f}/{args.tokens}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

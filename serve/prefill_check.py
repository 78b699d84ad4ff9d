"""Chunked prefill on a real checkpoint, counted and compared -- never timed (issue 16).

1. **Arithmetic.** FLOPs of a prefill chunk of C positions against one 16-row decode step, so that
   ``--prefill-chunk`` can be chosen by what a chunk adds to a running stream's next token. The
   linear layers are counted by ``torch.utils.flop_counter`` on the float path; attention is
   added from the config (4 x hidden x layers FLOPs a key a query: ``QK^T`` and ``PV``), because
   the counter does not see the CPU attention kernel.
2. **Bits.** The server's ``kvbatch.Prefill`` in chunks of C against one whole-prompt forward, on
   the fast path (bf16, int4 kernels, what ``llmslim serve`` runs) and the float32 path
   (``--no-fast``): is the KV cache bit for bit the same, how far apart are the last position's
   logits, and are the next 16 greedy tokens the same.

    python serve/prefill_check.py out/quality/gptq4-g128 --json serve/results/prefill_check.json
    python serve/prefill_check.py --smoke          # a tiny random model: proves the script runs
"""

from __future__ import annotations

import argparse
import json

import torch

from llmslim.runtime.cache import cache_kwarg
from llmslim.server.kvbatch import PaddedBatch, Prefill, prefill
from llmslim.util import atomic_path


def attention_flops(config, queries: int, start: int) -> float:
    """FLOPs of attention for ``queries`` positions from ``start`` on, each over every key up to itself."""
    text = config.get_text_config(decoder=True)
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    keys = queries * start + queries * (queries + 1) / 2
    return 4 * width * text.num_hidden_layers * keys


def linear_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count(model, chunks: list[int], starts: list[int], rows: int = 16, context: int = 512) -> dict:
    config = model.config
    batch = PaddedBatch(model)
    for i in range(rows):
        cache, _ = prefill(model, [(7 * i + j) % 200 + 10 for j in range(context)], all_logits=False)
        batch.add(cache, context)
    decode = linear_flops(lambda: batch.step([5] * rows)) + rows * attention_flops(config, 1, context)
    out = {"decode_step": {"rows": rows, "context": context, "gflop": decode / 1e9}, "chunks": []}
    print(f"decode step, {rows} rows at {context} positions: {decode / 1e9:.2f} GFLOP")
    for chunk in chunks:
        for start in starts:
            run = Prefill(model, [(3 * j) % 200 + 10 for j in range(start + chunk)], start or chunk)
            if start:
                run.step()  # the cache up to ``start``, then the chunk counted
                run.chunk = chunk
            lin = linear_flops(run.step)
            total = lin + attention_flops(config, chunk, start)
            out["chunks"].append({"chunk": chunk, "start": start, "linear_gflop": lin / 1e9,
                                  "gflop": total / 1e9, "decode_steps": total / decode})
            print(f"chunk {chunk:4d} at position {start:5d}: {lin / 1e9:6.1f} GFLOP linear "
                  f"({lin / chunk / 1e6:.0f} MFLOP a position) + attention = {total / 1e9:6.1f} GFLOP "
                  f"= {total / decode:4.1f} decode steps")
    return out


def greedy(model, run: Prefill, steps: int) -> list[int]:
    """``steps`` greedy tokens after a finished prefill, through the model's own forward."""
    kw = {cache_kwarg(model): run.cache}
    logits, pos, out = run.last, len(run.prompt), []
    with torch.inference_mode():
        for _ in range(steps):
            out.append(int(logits.argmax()))
            logits = model(input_ids=torch.tensor([[out[-1]]]), position_ids=torch.tensor([[pos]]),
                           use_cache=True, **kw).logits[0, -1]
            pos += 1
    return out


def prefilled(model, prompt: list[int], chunk: int) -> Prefill:
    run = Prefill(model, prompt, chunk)
    while not run.finished:
        run.step()
    return run


def compare(model, prompts: dict[int, list[int]], chunks: list[int], label: str) -> list[dict]:
    rows = []
    for n, prompt in prompts.items():
        whole = prefilled(model, prompt, n)
        want = greedy(model, whole, 16)  # (appends 16 positions to its cache: compared up to n below)
        for chunk in chunks:
            if chunk >= n:
                continue
            run = prefilled(model, prompt, chunk)
            kv = all(torch.equal(a.keys[:, :, :n], b.keys) and torch.equal(a.values[:, :, :n], b.values)
                     for a, b in zip(whole.cache.layers, run.cache.layers, strict=True))
            row = {"path": label, "prompt": n, "chunk": chunk, "kv_bit_equal": kv,
                   "last_logits_max_diff": float((whole.last.float() - run.last.float()).abs().max()),
                   "greedy16_same": greedy(model, run, 16) == want}
            rows.append(row)
            print(f"{label:5s} prompt {n:5d} chunk {chunk:4d}: KV bit-equal {kv!s:5s}  "
                  f"last logits max |diff| {row['last_logits_max_diff']:.3g}  16 greedy tokens same {row['greedy16_same']}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="a checkpoint llmslim serve reads")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, small sizes: proves the script runs")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        import transformers

        from llmslim.runtime.fast import accelerate

        def load(fast: bool):
            torch.manual_seed(0)
            config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            return (accelerate(model, torch.bfloat16) if fast else model), None

        lengths, chunks, starts = [40, 100], [16, 32], [0, 64]
    elif args.checkpoint:
        from llmslim.loader import load as load_checkpoint
        from llmslim.runtime.fast import accelerate

        def load(fast: bool):
            model, tok = load_checkpoint(args.checkpoint, dtype=torch.bfloat16 if fast else torch.float32)
            return (accelerate(model) if fast else model), tok

        lengths, chunks, starts = [200, 700, 1500], [64, 256, 512], [0, 1024, 3840]
    else:
        ap.error("give a checkpoint, or --smoke")
    result = {"checkpoint": args.checkpoint or "tiny random llama", "compare": []}
    model, tok = load(False)
    result["count"] = count(model, chunks, starts)
    if args.smoke:
        prompts = {n: torch.randint(0, 320, (n,)).tolist() for n in lengths}
    else:
        from llmslim.data import load_documents

        ids = tok("\n\n".join(str(d) for d in load_documents("wiki", "eval")[:40]))["input_ids"]
        prompts = {n: ids[:n] for n in lengths}
    result["compare"] += compare(model, prompts, chunks, "fp32")
    del model
    model, _ = load(True)
    result["compare"] += compare(model, prompts, chunks, "fast")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

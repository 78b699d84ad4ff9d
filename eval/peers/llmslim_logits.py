"""Logits of GPTQ checkpoints as llmslim's own loader computes them (the reference side of the
consumer-compatibility check). Run in the llmslim venv:

    python eval/peers/llmslim_logits.py OUT.pt CKPT_DIR [CKPT_DIR ...]

Saves {name: {"input_ids": [prompts], "logits": [float32 [len, vocab]]}} for a fixed prompt set;
eval/peers/consumer_check.py (GPTQModel venv) reloads the same folders with GPTQModel/transformers
and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmslim.loader import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import PROMPTS  # noqa: E402


@torch.no_grad()
def main() -> None:
    out, dirs = sys.argv[1], sys.argv[2:]
    results = {}
    for d in dirs:
        model, tok = load(d)
        ids = [tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in PROMPTS]
        logits = [model(input_ids=x).logits[0].float() for x in ids]
        results[Path(d).name] = {"dir": str(Path(d).resolve()), "input_ids": ids, "logits": logits}
        print(f"{Path(d).name}: {len(ids)} prompts, last-token argmax {[int(lg[-1].argmax()) for lg in logits]}",
              flush=True)
    torch.save(results, out)


if __name__ == "__main__":
    main()

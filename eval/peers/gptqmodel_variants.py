"""Reverse direction of the compatibility check: GPTQModel 7.7.0 quantizes, llmslim loads.

Run in the GPTQModel venv:

    GPTQMODEL_CPU_WORKERS=2 HF_HUB_OFFLINE=1 python eval/peers/gptqmodel_variants.py CALIB.pt OUTROOT [NAME ...]

CALIB.pt is eval/gptqmodel_compare.py's calib.pt (its first 16 windows, cut to 256 tokens, are
used: the format, not the quality, is under test). Each variant is saved to OUTROOT/NAME. Then
the same check as the forward direction: llmslim's logits of those folders (llmslim venv)

    python eval/peers/llmslim_logits.py OUTROOT/llmslim_logits.pt OUTROOT/gm_*

against GPTQModel's/transformers' own loading of them (GPTQModel venv)

    python eval/peers/consumer_check.py OUTROOT/llmslim_logits.pt
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

VARIANTS = {
    "gm4_g128_sym": dict(bits=4, group_size=128, sym=True),
    "gm4_g128_asym": dict(bits=4, group_size=128, sym=False),
    "gm4_g128_descact": dict(bits=4, group_size=128, sym=True, desc_act=True),
    "gm3_g128_sym": dict(bits=3, group_size=128, sym=True),
    "gm8_g128_asym": dict(bits=8, group_size=128, sym=False),
    "gm2_g64_asym": dict(bits=2, group_size=64, sym=False),
}


def main() -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    calib_path, root, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:] or list(VARIANTS)
    root.mkdir(parents=True, exist_ok=True)
    calib = torch.load(calib_path)
    data = [{"input_ids": t[:256].clone(), "attention_mask": torch.ones(256, dtype=torch.long)}
            for t in calib["tokens"][:16]]
    for name in names:
        out = root / name
        if not (out / "config.json").exists():
            model = GPTQModel.load(calib["model_dir"], QuantizeConfig(**VARIANTS[name]), dtype=torch.float32)
            model.quantize(data)
            model.save(str(out))
            del model
        print(f"{name}: saved to {out}", flush=True)


if __name__ == "__main__":
    main()

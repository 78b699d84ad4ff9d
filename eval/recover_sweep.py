"""Block-recovery variants side by side on one accelerator: which start (GPTQ or round-to-nearest),
which code space (fixed codes or codes re-rounded on the learned scale, ``RecoverConfig.follow``),
how many iterations. The same driver (``recover_blocks``), calibration tensor and held-out windows as
eval/bench_recover.py, so a variant's ranking here says which one is worth an hour on the CPU.

The figures are the accelerator's (its bf16 kernels round differently from a CPU's): they rank
variants; the benchmark's figures are bench_recover.py's, on the CPU.

    python eval/recover_sweep.py --model smollm2-135m --calib CALIB.pt --eval-ids IDS.pt \\
        --variants gptq rtn+follow rtn gptq+follow --out sweep.jsonl

CALIB.pt: the benchmark's calibration tensor (bench_recover.py writes it next to its --out, ``.calib.pt``);
IDS.pt: its held-out windows ``[44, 1024]`` (the tokens of ``eval_text("wiki")``). A variant is
``START[+follow][@ITERS][/lrLR][/fp32]``, START ``gptq`` or ``rtn`` (3-bit g128 unless --bits/--group),
``-full`` for the full-range symmetric grid (``IntConfig.full_range``). The starts are reported as rows
``START (start)``, before any recovery.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmslim.config import GPTQConfig, RecoverConfig, RTNConfig  # noqa: E402
from llmslim.formats.hf import load_hf  # noqa: E402
from llmslim.metrics.scoring import score_windows  # noqa: E402
from llmslim.metrics.windows import gptq_windows  # noqa: E402
from llmslim.models import resolve  # noqa: E402
from llmslim.nn import decoded_weights  # noqa: E402
from llmslim.pipeline.stages import Context, handler_for  # noqa: E402
from llmslim.quant.reconstruct import recover_blocks  # noqa: E402

VARIANT = re.compile(r"^(?P<start>(?:gptq|rtn)(?:-full)?)(?P<follow>\+follow)?(?:@(?P<iters>\d+))?(?:/lr(?P<lr>[0-9.e-]+))?"
                     r"(?P<fp32>/fp32)?$")


def perplexity(model, ids: torch.Tensor) -> float:
    """llmslim's GPTQ method (``metrics.ppl``): the rows of ``ids`` as non-overlapping windows, no BOS,
    each window's first token unscored; float32 weights."""
    windows = gptq_windows(ids.flatten().tolist(), ids.shape[1])
    with decoded_weights(model):
        scores = score_windows(model, windows, progress=False)
    return math.exp(math.fsum(s.nll for s in scores) / sum(s.n for s in scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, required=True)
    p.add_argument("--eval-ids", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=["gptq", "rtn+follow"])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    specs = {v: VARIANT.match(v) for v in args.variants}
    if not all(specs.values()):
        raise SystemExit(f"unknown variant(s): {[v for v, m in specs.items() if not m]}")

    dev = args.device
    calib, ids = torch.load(args.calib), torch.load(args.eval_ids)
    teacher = load_hf(resolve(args.model), torch.float32).eval()

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    emit({"row": "fp32", "ppl": perplexity(teacher.to(dev), ids), "device": torch.cuda.get_device_name()
          if dev.startswith("cuda") else "cpu", "torch": torch.__version__})
    starts = {}
    for name in sorted({m["start"] for m in specs.values()}):
        grid = dict(bits=args.bits, group_size=args.group, full_range=name.endswith("-full"))
        config = GPTQConfig(**grid) if name.startswith("gptq") else RTNConfig(**grid)
        student = copy.deepcopy(teacher).cpu()
        t0 = time.perf_counter()
        handler_for(config).run(student, config, Context(calib, device=dev))
        seconds = time.perf_counter() - t0
        starts[name] = student
        emit({"row": f"{name} (start)", "ppl": perplexity(student.to(dev), ids), "seconds": seconds})
    for variant, m in specs.items():
        student = copy.deepcopy(starts[m["start"]]).to(dev)
        config = RecoverConfig(iters=int(m["iters"] or 200), batch_size=8, lr=float(m["lr"]) if m["lr"] else None,
                               follow=bool(m["follow"]), amp=not m["fp32"])
        t0 = time.perf_counter()
        logs = recover_blocks(student, teacher, calib.to(dev), config, progress=False, log=lambda s: None)
        seconds = time.perf_counter() - t0
        emit({"row": variant, "ppl": perplexity(student, ids), "seconds": seconds,
              "kept": sum(x.kept == "recovered" for x in logs),
              "block_loss": [sum(x.loss_before for x in logs), sum(min(x.loss_before, x.loss_after) for x in logs)]})
        del student


if __name__ == "__main__":
    main()

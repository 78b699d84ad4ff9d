"""Models bigger than memory: peak RSS of ``llmslim quantize`` against model size (issue 19).

Synthetic Llama models (random fp16 weights, several safetensors shards, a small byte-level BPE
tokenizer trained on the built-in wiki text) are written tensor by tensor, so making a model never
needs its size in memory either. Each quantize run is its own process; its peak RSS is that
process's VmHWM (``llmslim.util.rss_bytes``), beside wall time and the 1-minute load average
sampled every 5 s (the machine is shared: times mean little without it).

    python eval/scale.py make /tmp/scale/llama-1.5b --preset 1.5b
    python eval/scale.py measure /tmp/scale/llama-1.5b --method gptq --nsamples 8 --seqlen 256 \
        --json eval/results/scale/llama-1.5b-gptq.json
    python eval/scale.py table eval/results/scale/*.json --md eval/results/scale.md

Presets (hidden, MLP, blocks, heads, KV heads, vocabulary): see ``PRESETS``; any shape with
``--hidden --intermediate --layers ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "tiny": (256, 704, 4, 8, 2, 4096),
    "250m": (1024, 2816, 20, 16, 4, 16000),
    "500m": (1024, 2816, 40, 16, 4, 16000),
    "1.5b": (2048, 5632, 32, 32, 4, 32000),  # 1.54B parameters, 3.1 GB in fp16
    "3b": (2048, 5632, 64, 32, 4, 32000),  # the same blocks, twice as many: 2.95B, 5.9 GB
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B's shapes: ~6.7B, ~13.5 GB
}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def make_tokenizer():
    """A small byte-level BPE (1024 tokens) trained on the built-in wiki calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmslim.data import load_documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(load_documents("wiki", "calib")[:400], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def make(out: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
         shard_size: str = "1GB", seed: int = 0) -> dict:
    """Write a random fp16 Llama as an HF folder, one tensor (in pieces of rows) at a time."""
    import torch
    from transformers import LlamaConfig

    from llmslim.formats.stream import ShardWriter, empty_model
    from llmslim.util import staged_output

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16")
    model = empty_model(config, torch.float16)
    plan = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    with staged_output(out, force=True) as tmp:
        writer = ShardWriter(tmp, plan, shard_size, total_parameters=model.num_parameters())
        for name, t in plan.items():
            if name.endswith("norm.weight"):
                writer.write(name, torch.ones(t.shape, dtype=torch.float16))
                continue
            step = max(1, (32 * 2**20) // (t[0].numel() * 4))
            for start in range(0, t.shape[0], step):
                rows = min(step, t.shape[0] - start)
                piece = torch.randn((rows, *t.shape[1:]), generator=g).mul_(0.02).to(torch.float16)
                writer.write(name, piece, first_row=start)
        writer.close()
        model.config.architectures = ["LlamaForCausalLM"]
        model.config.save_pretrained(tmp)
        make_tokenizer().save_pretrained(tmp)
    params = model.num_parameters()
    return {"parameters": params, "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
            "shards": len(list(out.glob("*.safetensors")))}


RUNNER = """
import json, sys
from llmslim.cli import main
from llmslim.util import rss_bytes
rc = main(sys.argv[2:])
json.dump({"rc": rc, "peak_rss": rss_bytes()[1]}, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def measure(model: Path, method: str, extra: list[str], out_dir: Path | None = None) -> dict:
    """One ``llmslim quantize`` in a process of its own: peak RSS, wall time, load average."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="llmslim-scale-", dir=out_dir))
    out, result = work / "out", work / "rss.json"
    args = ["quantize", str(model), "--method", method, "--out", str(out), *extra]
    samples = [loadavg()]
    stop = threading.Event()

    def sample():
        while not stop.wait(5):
            samples.append(loadavg())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(result), *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"llmslim quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak = json.loads(result.read_text())["peak_rss"]
    from llmslim.models import resolve

    folder = Path(resolve(str(model)))  # an alias or .gguf: the folder it was converted into
    config = json.loads((folder / "config.json").read_text())
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    out_shards = len(list(out.glob("*.safetensors")))
    index = (out / "model.safetensors.index.json").exists()
    shutil.rmtree(work)
    return {
        "command": "llmslim " + shlex.join("OUT" if a == str(out) else a for a in args),
        "model": str(model), "method": method, "model_bytes": model_bytes,
        "model_shards": len(list(folder.glob("*.safetensors"))),
        "parameters": _parameters(config), "hidden": config["hidden_size"], "layers": config["num_hidden_layers"],
        "peak_rss": peak, "seconds": round(seconds, 1), "out_bytes": out_bytes, "out_shards": out_shards,
        "out_index": index, "load_avg": {"min": min(samples), "max": max(samples),
                                         "mean": round(sum(samples) / len(samples), 2)},
        "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _parameters(c: dict) -> int:
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    block = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return n * block + (1 if c.get("tie_word_embeddings") else 2) * v * h + h


def table(files: list[Path]) -> str:
    rows = [json.loads(f.read_text()) for f in files]
    rows.sort(key=lambda r: (r["model_bytes"], r["method"]))
    lines = ["| model (fp16 on disk) | parameters | blocks | method | peak RSS | peak RSS / model size | wall time | "
             "load avg (min-max) | output | command |",
             "|---|---:|---:|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model_bytes'] / 1e9:.2f} GB, {r['model_shards']} shards | {r['parameters'] / 1e9:.2f} B | "
            f"{r['layers']} | {r['method']} | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_rss'] / r['model_bytes']:.2f} | "
            f"{r['seconds']:.0f} s | {r['load_avg']['min']:.1f}-{r['load_avg']['max']:.1f} | "
            f"{r['out_bytes'] / 1e9:.2f} GB in {r['out_shards']} shard{'s' if r['out_shards'] > 1 else ''}"
            f"{' + index' if r['out_index'] else ''} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    m = sub.add_parser("make", help="write a synthetic Llama")
    m.add_argument("out", type=Path)
    m.add_argument("--preset", choices=PRESETS)
    for flag in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab"):
        m.add_argument(f"--{flag}", type=int)
    m.add_argument("--shard-size", default="1GB")
    r = sub.add_parser("measure", help="peak RSS and time of one llmslim quantize")
    r.add_argument("model", type=Path, help="model folder (or an alias such as smollm2-135m)")
    r.add_argument("--method", choices=("rtn", "gptq"), required=True)
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--work", type=Path, default=None, help="where the output is written (then deleted)")
    t = sub.add_parser("table", help="Markdown table of measure results")
    t.add_argument("files", type=Path, nargs="+")
    t.add_argument("--md", type=Path)
    args, extra = p.parse_known_args()
    if args.step == "make":
        shape = dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"),
                         PRESETS[args.preset] if args.preset else (None,) * 6, strict=True))
        for k in shape:
            if getattr(args, k) is not None:
                shape[k] = getattr(args, k)
        if None in shape.values():
            p.error("give --preset or every shape flag")
        print(json.dumps(make(args.out, **shape, shard_size=args.shard_size)))
    elif args.step == "measure":
        extra = extra or (["--nsamples", "8", "--seqlen", "256"] if args.method == "gptq" else [])
        res = measure(args.model, args.method, extra, args.work)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res, indent=1))
    else:
        md = table(args.files)
        if args.md:
            args.md.write_text(md)
        print(md)


if __name__ == "__main__":
    main()

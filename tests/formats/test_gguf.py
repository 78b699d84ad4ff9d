"""GGUF export: the Q4_0/Q8_0 grids against the gguf library's reference (de)quantizers, GPTQ on those
grids, the file read back by transformers' GGUF loader, metadata, and every bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

import llmslim
from llmslim.cli import main
from llmslim.config import CalibConfig, ExportConfig, GPTQConfig, RTNConfig
from llmslim.errors import UserError
from llmslim.formats.gguf import encode_blocks, layer_blocks, llama_cpp_dir
from llmslim.formats.gguf_mix import linear_type
from llmslim.grid import dequantize_groups, quantize_gguf_reference
from llmslim.nn import GPTQLinear
from llmslim.pipeline.run import export_to_file
from llmslim.quant.gptq import gptq_quantize, layer_loss
from tests.conftest import make_tiny_model, make_tiny_tokenizer

gguf = pytest.importorskip("gguf")
KINDS = ("q4_0", "q8_0")
BITS = {"q4_0": 4, "q8_0": 8}


def qtype(kind: str):
    return gguf.GGMLQuantizationType[kind.upper()]


def llama_cpp_missing() -> str | None:
    try:
        llama_cpp_dir()
        import sentencepiece  # noqa: F401
    except (UserError, ImportError) as e:
        return str(e)
    return None


needs_llama_cpp = pytest.mark.skipif(llama_cpp_missing() is not None,
                                     reason=f"llama.cpp's conversion code is unavailable: {llama_cpp_missing()}")


def awkward_weights(rows: int = 24, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Random rows plus the blocks that trip quantizers: all zeros, a positive maximum, a tie between
    +m and -m, a single outlier, tiny values."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows)[:, None]
    W[0, :32] = 0
    W[1, 32:64] = torch.linspace(-1, 3, 32)
    W[2, 64:96] = 0.1
    W[2, 70], W[2, 71] = 0.5, -0.5
    W[3, 96:128] = 1e-3
    W[3, 100] = 40.0
    W[4, 128:160] = 1e-6 * torch.randn(32, generator=g)
    return W


def codes(Q, scales, zeros):
    return scales.T.contiguous(), Q.long() - zeros[0, 0].long()


@pytest.mark.parametrize("kind", KINDS)
def test_round_to_nearest_is_llama_cpp_bit_for_bit(kind):
    W = awkward_weights()
    Q, scales, zeros = quantize_gguf_reference(W, kind)
    ours = encode_blocks(kind, *codes(Q, scales, zeros))
    ref = gguf.quants.quantize(W.numpy(), qtype(kind))
    assert ours.shape == ref.shape and np.array_equal(ours, ref)
    # The checkpoint built from these codes dequantizes exactly as llama.cpp does, and the reference
    # quantizer maps those dequantized weights back to the very same bytes (but for the sign of the
    # zero scale of an all-zero block: -0.0 / -8 is +0.0).
    g_idx = torch.arange(W.shape[1]) // 32
    deq = dequantize_groups(Q, scales, zeros, g_idx).numpy()
    assert np.array_equal(deq, gguf.quants.dequantize(ref, qtype(kind)))
    again = gguf.quants.quantize(deq, qtype(kind)).reshape(W.shape[0], -1, ref.shape[1] // (W.shape[1] // 32))
    nonzero = (deq.reshape(W.shape[0], -1, 32) != 0).any(-1)
    assert np.array_equal(again[nonzero], ref.reshape(again.shape)[nonzero])


@pytest.mark.parametrize("kind", KINDS)
def test_block_layout_round_trips_through_the_reference_dequantizer(kind):
    g = torch.Generator().manual_seed(1)
    lo, hi = (-8, 7) if kind == "q4_0" else (-128, 127)
    k = torch.randint(lo, hi + 1, (8, 128), generator=g)
    d = (torch.randn(8, 4, generator=g) * 0.01).half().float()
    deq = gguf.quants.dequantize(encode_blocks(kind, d, k), qtype(kind))
    assert np.array_equal(deq, (d.repeat_interleave(32, 1) * k).numpy())


def hessian(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) * torch.linspace(0.2, 3, cols)
    return 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mse,importance", [(False, None), (True, None), (True, "hessian"), (True, "imatrix")])
def test_gptq_on_the_grid_exports_losslessly_and_beats_llama_cpp_rounding(kind, mse, importance):
    W, H = awkward_weights(), hessian(256)
    r = gptq_quantize(W, H, BITS[kind], 32, sym=True, mse=mse, grid=kind, act_group_aware=True,
                      importance=importance)
    layer = GPTQLinear.from_codes(r.Q, r.scales, r.zeros, r.g_idx, 32, BITS[kind], None)
    d, k = layer_blocks(layer, kind)
    raw = encode_blocks(kind, d, k)
    deq = gguf.quants.dequantize(raw, qtype(kind))
    assert np.array_equal(deq, layer.dequantized_weight().numpy())  # lossless: the checkpoint's weights exactly
    # Where a block reaches the end of the grid (Q4_0: some q = 0; Q8_0: |k| = 127), llama.cpp's own
    # quantizer, given the dequantized weights, picks the same scale: the bytes are identical there.
    ref = gguf.quants.quantize(deq, qtype(kind))
    kb = k.reshape(k.shape[0], -1, 32)
    ends = (kb == -8).any(-1) if kind == "q4_0" else ((kb.abs() == 127).any(-1) & (kb > -128).all(-1))
    ends |= (kb == 0).all(-1)
    bsize = 18 if kind == "q4_0" else 34
    same = (raw.reshape(*ends.shape, bsize) == ref.reshape(*ends.shape, bsize)).all(-1)
    # (the importance-weighted search also widens ranges, so then fewer blocks reach the end.)
    assert bool(same[ends.numpy()].all()) and ends.float().mean() > (0.1 if importance else 0.5)
    rtn = dequantize_groups(*quantize_gguf_reference(W, kind), torch.arange(256) // 32)
    assert layer_loss(W, torch.from_numpy(deq), H) < layer_loss(W, rtn, H)


def test_which_checkpoints_are_on_the_q4_0_grid():
    W, H = awkward_weights(), hessian(256)

    def layer(**kw):
        opts = dict(bits=4, group_size=32, sym=True) | kw
        r = gptq_quantize(W, H, **opts)
        return GPTQLinear.from_codes(r.Q, r.scales, r.zeros, r.g_idx, opts["group_size"], opts["bits"], None)

    layer_blocks(layer(group_size=128), "q4_0")  # groups of whole blocks share a scale: exact
    layer_blocks(layer(desc_act=True, static_groups=True), "q4_0")  # act-order folded back by g_idx
    layer_blocks(layer(), "q8_0")  # 4-bit codes fit Q8_0 exactly
    # The full-range grid at 4 bits g32 is Q4_0's own rule (d = m / -8, signed): its blocks are the file's.
    full = layer(full_range=True)
    d, k = layer_blocks(full, "q4_0")
    assert (d < 0).any() and int(k.min()) == -8
    assert torch.equal((d.repeat_interleave(32, 1) * k).float(), full.dequantized_weight().float())
    for kw, needle in ((dict(group_size=16), "split blocks"), (dict(desc_act=True), "static-groups"),
                       (dict(sym=False), "asymmetric"), (dict(bits=8), "outside")):
        with pytest.raises(ValueError, match=needle):
            layer_blocks(layer(**kw), "q4_0")


# --- end to end: files llama.cpp's conversion writes, read back by transformers ---------------------

def spm_tokenizer_model(vocab: int = 400) -> bytes:
    import sentencepiece as spm

    text = ["Once upon a time there was a little girl named Lily. She liked to play in the park.",
            "The quick brown fox jumps over the lazy dog. The article was written in the year 2007.",
            "def main():\n    return 0\n"] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


# Every architecture llmslim exports, by the name tiny_gguf_model knows it, and the architecture
# llama.cpp's conversion writes (Mistral becomes "llama"). transformers has no GGUF reader for Gemma 1:
# llama.cpp alone checks it (test_llama_cpp_runs_every_architecture).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3": "gemma3", "phi3": "phi3", "gemma": "gemma"}
READ_BY_TRANSFORMERS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
WINDOW = 8  # Gemma 2/3's sliding window: shorter than the test inputs, so a lost window shows in the logits


def tiny_gguf_model(arch: str):
    import transformers as T

    if arch in ("llama", "qwen2"):
        return make_tiny_model(arch, vocab_size=400)
    torch.manual_seed(0)
    common = dict(vocab_size=400, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    cfg = {
        "mistral": lambda: T.MistralConfig(**common),
        # transformers 5.24 reads a GGUF qwen3 with its default head_dim (128); llama.cpp and transformers
        # both take Gemma 2/3's query_pre_attn_scalar to be the head size (256 in the real models, the
        # default): the tiny models keep those defaults so that every reader computes the same model.
        "qwen3": lambda: T.Qwen3Config(head_dim=128, **common),
        "gemma": lambda: T.GemmaConfig(head_dim=16, **common),
        "gemma2": lambda: T.Gemma2Config(head_dim=256, sliding_window=WINDOW, **common),
        "gemma3": lambda: T.Gemma3TextConfig(head_dim=256, sliding_window=WINDOW, **common),
        "phi3": lambda: T.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common),  # fused qkv, gate_up
    }[arch]()
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def spm_folder(tmp_path):
    """A tiny model whose folder has a sentencepiece ``tokenizer.model`` (which llama.cpp's converter
    reads without knowing the tokenizer) beside the tiny BPE tokenizer llmslim loads."""

    def make(arch: str = "llama", name: str | None = None):
        path = tmp_path / (name or f"src-{arch}")  # the folder's name becomes the file's general.name
        tiny_gguf_model(arch).save_pretrained(path)
        make_tiny_tokenizer().save_pretrained(path)
        (path / "tokenizer.model").write_bytes(spm_tokenizer_model())
        return path

    return make


def read_back(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def linear_weights(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GPTQLinear):
            out[name] = m.dequantized_weight()
        elif isinstance(m, torch.nn.Linear) and name != "lm_head":
            out[name] = m.weight.detach().float()
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@needs_llama_cpp
def test_gptq_checkpoint_exports_bit_exact_and_transformers_reads_it(spm_folder, tmp_path):
    src = spm_folder("llama")
    ckpt, out = tmp_path / "ckpt", tmp_path / "model.gguf"
    calib = CalibConfig("wiki", nsamples=4, seqlen=32)
    llmslim.quantize_to_folder(str(src), ckpt, GPTQConfig(target="gguf-q4_0", desc_act=True, static_groups=True),
                               calib)
    assert main(["export", str(ckpt), "--type", "q4_0", "--out", str(out),
                 "--token-embedding-type", "f32", "--output-tensor-type", "f32"]) == 0
    model, _ = llmslim.load(str(ckpt))
    back = read_back(out)
    ours, theirs = linear_weights(model), linear_weights(back)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name in ours:  # every quantized weight, exactly (q/k rows went through llama.cpp's permutation and back)
        assert torch.equal(ours[name], theirs[name]), name
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-4, atol=1e-4)

    reader = gguf.GGUFReader(out)
    kv = {k: f.contents() for k, f in reader.fields.items()}
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 2
    assert kv["llama.embedding_length"] == 64 and kv["llama.attention.head_count_kv"] == 2
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 400
    recipe = llmslim.parse_recipe(__import__("yaml").safe_load(kv["llmslim.recipe"]))
    assert [s.stage for s in recipe.stages] == ["gptq", "export"] and recipe.stages[0].target == "gguf-q4_0"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert sum(t == "Q4_0" for t in types.values()) == 14
    assert types["token_embd.weight"] == "F32" and types["output.weight"] == "F32"

    # Defaults: token embedding Q4_0, output Q8_0, as llama-quantize chooses for a Q4_0 file.
    out2 = tmp_path / "default.gguf"
    assert main(["export", str(ckpt), "--out", str(out2)]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out2).tensors}
    assert types["token_embd.weight"] == "Q4_0" and types["output.weight"] == "Q8_0"


@needs_llama_cpp
@pytest.mark.parametrize("arch", READ_BY_TRANSFORMERS)
def test_each_architecture_round_trips_through_transformers(spm_folder, tmp_path, arch):
    """A checkpoint on the Q4_0 grid of each architecture, exported: transformers' GGUF loader reads
    every quantized weight back exactly (Phi-3's fused qkv/gate_up too), the logits equal the
    checkpoint's (so norms, rotary settings, Gemma's soft-capping and sliding windows crossed over),
    and the metadata names the architecture llama.cpp's conversion gives it."""
    src = spm_folder(arch)
    ckpt, out = tmp_path / "ckpt", tmp_path / f"{arch}.gguf"
    llmslim.quantize_to_folder(str(src), ckpt, RTNConfig(target="gguf-q4_0"))
    assert main(["export", str(ckpt), "--type", "q4_0", "--out", str(out),
                 "--token-embedding-type", "f32", "--output-tensor-type", "f32"]) == 0
    model, _ = llmslim.load(str(ckpt))
    back = read_back(out)
    ours, theirs = linear_weights(model), linear_weights(back)
    assert ours.keys() == theirs.keys() and len(ours) == (8 if arch == "phi3" else 14)
    assert all(isinstance(m, GPTQLinear) for n, m in model.named_modules() if n in ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = torch.randint(0, 300, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
    kv = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    a = GGUF_ARCH[arch]
    assert kv["general.architecture"] == a and kv[f"{a}.block_count"] == 2 and kv[f"{a}.embedding_length"] == 64
    if arch.startswith("gemma"):
        assert kv[f"{a}.attention.sliding_window"] == WINDOW


@needs_llama_cpp
@pytest.mark.parametrize("arch,kind", [("llama", "q4_k_m"), ("mistral", "q5_1"), ("qwen2", "q8_0"),
                                       ("qwen3", "q4_0"), ("gemma2", "q4_0"), ("gemma3", "q5_0"),
                                       ("phi3", "q4_k_m")])
def test_float_model_export_is_llama_cpp_rounding(spm_folder, tmp_path, arch, kind):
    """Each tensor in the type llama-quantize gives it (64-wide rows: the K types fall back to the
    legacy ones, which gguf's reference quantizer checks), rounded as llama.cpp does."""
    src = spm_folder(arch)
    out = tmp_path / f"{arch}.gguf"
    summary = export_to_file(str(src), ExportConfig(type=kind), out)
    assert summary["bytes_after"] == out.stat().st_size
    model, _ = llmslim.load(str(src))
    back = read_back(out)
    ours, theirs = linear_weights(model), linear_weights(back)
    assert ours.keys() == theirs.keys() and len(ours) == (8 if arch == "phi3" else 14)
    for name, W in ours.items():  # transformers reads back exactly llama.cpp's rounding of the float weight
        t = qtype(linear_type(kind, name, W.shape[1], 2))
        expect = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), t), t)
        assert np.array_equal(theirs[name].numpy(), expect), name


@needs_llama_cpp
def test_quantize_straight_to_gguf_equals_checkpoint_then_export(spm_folder, tmp_path):
    """``quantize --target ... --out x.gguf`` is the one-stage recipe ``rtn -> export``; RTN on the
    Q8_0 grid is llama.cpp's rounding, so it matches exporting the float model directly."""
    src = spm_folder("llama")
    direct, via = tmp_path / "direct.gguf", tmp_path / "float.gguf"
    assert main(["quantize", str(src), "--method", "rtn", "--target", "gguf-q8_0", "--out", str(direct)]) == 0
    assert main(["export", str(src), "--type", "q8_0", "--out", str(via)]) == 0
    a, b = gguf.GGUFReader(direct), gguf.GGUFReader(via)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type and np.array_equal(ta[name].data, tb[name].data), name
    assert not list(tmp_path.glob(".*partial")) and not list(tmp_path.glob(".*.tmp"))


# --- bad input: one line, exit 2, no file ------------------------------------------------------

def error_lines(stderr: str) -> str:
    """stderr without the progress bars of the work done before a mistake showed."""
    return "\n".join(ln for ln in stderr.strip().splitlines() if ln.strip() and "%|" not in ln)


def test_bad_export_inputs(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    g16, asym = tmp_path / "g16", tmp_path / "asym"
    llmslim.quantize_to_folder(str(src), g16, RTNConfig(bits=4, group_size=16))
    llmslim.quantize_to_folder(str(src), asym, RTNConfig(bits=4, group_size=32, sym=False))
    bnb = tmp_path / "bnb"
    bnb.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (bnb / "config.json").write_text(json.dumps(cfg | {"quantization_config": {"quant_method": "bitsandbytes"}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [{rtn: {bits: 4, group_size: 16}}, {export: {type: q4_0}}]\n")
    out = tmp_path / "x.gguf"
    cases = [
        (["export", str(src), "--type", "q3_k_m"], "cannot produce yet"),
        (["export", str(src), "--type", "q5_9"], "is unknown"),
        (["export", str(src), "--format", "onnx"], "--format must be gguf"),
        (["export", str(g16), "--type", "q4_0"], "--target gguf-q4_0"),
        (["export", str(asym), "--type", "q4_0"], "asymmetric"),
        (["export", str(g16), "--type", "f16"], "would round"),
        (["export", str(bnb)], "bitsandbytes"),
        (["export", str(tiny_folder("gpt2"))], "GPT2LMHeadModel"),
        (["export", str(tiny_folder("opt"))], "OPTForCausalLM"),
        (["quantize", str(src), "--method", "rtn"], "needs --target"),
        (["quantize", str(src), "--method", "rtn", "--target", "gguf-q4_0", "--asym"], "symmetric"),
        (["quantize", str(src), "--method", "rtn", "--target", "gguf-q8_0", "--bits", "2"], "8-bit"),
        (["quantize", str(src), "--target", "gguf-q4_0", "--desc-act", "--no-act-group-aware"], "--static-groups"),
        (["quantize", str(src), "--method", "nf4", "--target", "gguf-q4_0"], "does not use --target"),
        (["export", str(g16), "--type", "q4_k_m"], "without rounding them again"),  # checkpoint -> another grid
        (["export", str(g16), "--type", "q4_1"], "export the original float model as q4_1"),  # no --target for it
        (["quantize", str(tiny_folder("gpt2")), "--method", "rtn", "--target", "gguf-q4_0"], "GPT2LMHeadModel"),
        (["compress", str(src), "--recipe", str(recipe)], "--target gguf-q4_0"),  # off-grid stage, then export
    ]
    for argv, needle in cases:
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = error_lines(capsys.readouterr().err)
        assert needle in err and len(err.splitlines()) == 1, (argv, err)
        assert "gguf-q4_1" not in err and "gguf-q5_" not in err, (argv, err)  # never a --target the CLI refuses
        assert not out.exists() and not list(tmp_path.glob(".x.gguf*")), argv  # no file, no partial work
    out.write_text("x")
    assert main(["export", str(src), "--out", str(out)]) == 2 and "--force" in capsys.readouterr().err
    assert main(["export", str(src), "--out", str(tmp_path / "model.bin")]) == 2


def test_recipe_export_stage_must_be_last():
    with pytest.raises(UserError, match="cannot follow"):
        llmslim.parse_recipe({"stages": [{"export": {"type": "q4_0"}}, {"rtn": {"bits": 4}}]})
    r = llmslim.parse_recipe({"stages": [{"gptq": {"target": "gguf-q8_0"}}, {"export": {"type": "q8_0"}}]})
    assert r.stages[0].bits == 8 and r.stages[0].group_size == 32
    assert llmslim.parse_recipe(r.to_dict()) == r
    with pytest.raises(UserError, match="unknown key"):
        llmslim.parse_recipe({"stages": [{"export": {"bits": 4}}]})


def test_missing_llama_cpp_is_one_line_and_leaves_nothing(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMSLIM_LLAMA_CPP", str(tmp_path / "nowhere"))
    out, src = tmp_path / "m.gguf", tiny_folder("llama")
    capsys.readouterr()
    assert main(["export", str(src), "--type", "q8_0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "llama.cpp" in err and "make llama-cpp" in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))


def test_a_sliding_window_the_file_cannot_keep_is_announced():
    """llama.cpp runs Mistral (as "llama"), Qwen2/3 and Phi-3 files with full attention: a model that
    limits attention to a window gets a warning; Gemma 2/3 keep theirs, a model without one needs none."""
    import transformers as T

    from llmslim.formats.gguf import sliding_window_lost

    assert "4096 tokens" in sliding_window_lost(tiny_gguf_model("mistral"))  # MistralConfig's default window
    assert sliding_window_lost(tiny_gguf_model("gemma2")) is None
    assert sliding_window_lost(tiny_gguf_model("qwen2")) is None  # use_sliding_window is off
    assert sliding_window_lost(tiny_gguf_model("llama")) is None
    phi = T.AutoModelForCausalLM.from_config(T.Phi3Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, sliding_window=2047))
    assert "Phi3ForCausalLM's sliding window (2047 tokens)" in sliding_window_lost(phi)


@needs_llama_cpp
def test_a_failed_conversion_leaves_the_old_file_and_nothing_else(tiny_folder, tmp_path, capsys):
    """llama.cpp's conversion fails (the tiny byte-level BPE tokenizer is one it does not know): one
    line, exit 2, and the file --force would have replaced is untouched, no temporary left."""
    out, src = tmp_path / "m.gguf", tiny_folder("llama")
    out.write_text("the previous file")
    capsys.readouterr()
    assert main(["export", str(src), "--type", "q8_0", "--out", str(out), "--force"]) == 2
    err = error_lines(capsys.readouterr().err)
    assert "llama.cpp's conversion" in err and "pre-tokenizer" in err and len(err.splitlines()) == 1
    assert out.read_text() == "the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model-llama"]


@needs_llama_cpp
def test_a_gguf_born_model_keeps_its_metadata(spm_folder, tmp_path, monkeypatch):
    """A model that was a GGUF file (converted tensor by tensor into a cached folder), exported again,
    directly or as a checkpoint made from it: its ``tokenizer.*`` metadata is the source file's, key for
    key, and every tensor is llama.cpp's rounding of the source file's own values."""
    monkeypatch.setenv("LLMSLIM_CACHE", str(tmp_path / "cache"))
    born = tmp_path / "born.gguf"
    export_to_file(str(spm_folder("llama")), ExportConfig(type="q8_0"), born)
    # the tokenizer files of the folder it came from are gone: only the GGUF file holds its vocabulary
    direct, ckpt, via = tmp_path / "direct.gguf", tmp_path / "ckpt", tmp_path / "via.gguf"
    assert main(["export", str(born), "--type", "q4_0", "--out", str(direct)]) == 0
    llmslim.quantize_to_folder(str(born), ckpt, RTNConfig(target="gguf-q4_0"))
    assert main(["export", str(ckpt), "--type", "q4_0", "--out", str(via)]) == 0

    src = gguf.GGUFReader(born)
    src_kv = {k: f.contents() for k, f in src.fields.items() if k.startswith("tokenizer.")}
    src_t = {t.name: t for t in src.tensors}
    assert len(src_kv["tokenizer.ggml.tokens"]) == 400
    for path in (direct, via):
        reader = gguf.GGUFReader(path)
        kv = {k: f.contents() for k, f in reader.fields.items()}
        assert {k: v for k, v in kv.items() if k.startswith("tokenizer.")} == src_kv, path
        assert kv["general.name"] == "born" and kv["llmslim.source"] == str(born)
        tensors = {t.name: t for t in reader.tensors}
        assert tensors.keys() == src_t.keys()
        for name, t in tensors.items():
            values = gguf.quants.dequantize(src_t[name].data, src_t[name].tensor_type)
            linear = name.startswith("blk.") and not name.endswith("norm.weight")
            if path == via and not linear:  # a GPTQ checkpoint keeps its float tensors (norms, embeddings) in fp16
                values = values.astype(np.float16).astype(np.float32)
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                assert np.array_equal(np.asarray(t.data, dtype=np.float32).reshape(values.shape), values), name
            else:  # the q/k rows went HF-ward and back through llama.cpp's permutation: same order
                assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(values, t.tensor_type)), name

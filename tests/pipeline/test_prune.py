"""``llmslim prune`` and the prune stage end to end on tiny models: every method, recipes with GPTQ
after pruning, joint sparse + GPTQ, resume, eval/info reporting sparsity, and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmslim.cli import main
from llmslim.loader import load
from llmslim.quant.masks import nm_holds
from llmslim.quant.sparsity import sparsity_report
from tests.conftest import BlockCrash


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                for i in range(200)))
    return path


def calib(path):
    return ["--calib", str(path), "--nsamples", "8", "--seqlen", "32"]


@pytest.mark.parametrize("method,flags,sparsity,nm", [
    ("sparsegpt", ["--nm", "2:4"], 0.5, "2:4"),
    ("sparsegpt", ["--sparsity", "0.6"], 0.6, None),
    ("wanda", ["--nm", "4:8"], 0.5, "4:8"),
    ("wanda", ["--sparsity", "0.5"], 0.5, None),
    ("magnitude", ["--sparsity", "0.5"], 0.5, None),
])
def test_unstructured_methods(tiny_folder, tmp_path, calib_file, method, flags, sparsity, nm, capsys):
    src, out = tiny_folder("llama"), tmp_path / "out"
    extra = calib(calib_file) if method != "magnitude" else []
    assert main(["prune", str(src), "--method", method, *flags, *extra, "--out", str(out)]) == 0
    assert f"prune {method}" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    (record,) = cfg["pruning"]
    assert record["method"] == method and record["sparsity_measured"] == pytest.approx(sparsity, abs=0.01)
    assert record["nm_measured"] == nm
    plain = AutoModelForCausalLM.from_pretrained(out)  # an ordinary float checkpoint
    report = sparsity_report(plain)
    assert report["sparsity"] == pytest.approx(sparsity, abs=0.01) and report["nm"] == nm
    assert set(report["by_type"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert plain.lm_head.weight.ne(0).all()  # lm_head is never pruned
    log = json.loads((out / "quant_log.json").read_text())
    assert len(log["layers"]) == 14 and log["method"] == "prune"


def test_nm_act_order_is_the_default_and_recorded(tiny_folder, tmp_path, calib_file):
    src, outs = tiny_folder("llama"), {}
    for flags in ([], ["--no-act-order"]):
        out = tmp_path / f"o{len(flags)}"
        assert main(["prune", str(src), "--method", "sparsegpt", "--nm", "2:4", *flags, *calib(calib_file),
                     "--out", str(out)]) == 0
        (record,) = json.loads((out / "config.json").read_text())["pruning"]
        assert record["act_order"] is (not flags) and record["nm_measured"] == "2:4"
        outs[bool(flags)] = load_file(out / "model.safetensors")
    assert any(not torch.equal(outs[True][k], outs[False][k]) for k in outs[True])
    out = tmp_path / "unstructured"
    assert main(["prune", str(src), "--method", "sparsegpt", "--sparsity", "0.5", *calib(calib_file),
                 "--out", str(out)]) == 0
    assert "act_order" not in json.loads((out / "config.json").read_text())["pruning"][0]


@pytest.mark.parametrize("method,default", [("sparsegpt", 20), ("wanda", 0)])
def test_refit_default_is_recorded_and_lowers_every_layer_loss(tiny_folder, tmp_path, calib_file, method, default):
    """SparseGPT refits its kept weights by default, Wanda only when asked; a refit keeps the mask
    (same zeros) and lowers every layer's objective against the same run without it."""
    src, outs, logs = tiny_folder("llama"), {}, {}
    for iters in (0, 10):
        out = tmp_path / f"r{iters}"
        flags = ["--refit-iters", str(iters)] if iters or method == "sparsegpt" else []
        assert main(["prune", str(src), "--method", method, "--sparsity", "0.5", *flags, *calib(calib_file),
                     "--out", str(out)]) == 0
        (record,) = json.loads((out / "config.json").read_text())["pruning"]
        assert record["refit_iters"] == iters
        outs[iters] = load_file(out / "model.safetensors")
        logs[iters] = {x["name"]: x["layer_loss"] for x in json.loads((out / "quant_log.json").read_text())["layers"]}
    out = tmp_path / "default"
    assert main(["prune", str(src), "--method", method, "--sparsity", "0.5", *calib(calib_file), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["pruning"][0]["refit_iters"] == default
    first = "model.layers.0.self_attn.q_proj.weight"  # the same inputs either way: the same mask
    assert torch.equal(outs[0][first] == 0, outs[10][first] == 0)
    assert not torch.equal(outs[0][first], outs[10][first])
    if method == "sparsegpt":  # Wanda without refit logs no layer loss (it never forms the Hessian)
        assert all(logs[10][k] < logs[0][k] for k in logs[0]), (logs[0], logs[10])
    assert all(v is not None for v in logs[10].values())


def test_prune_then_gptq_keeps_the_pattern(tiny_folder, tmp_path, calib_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: {calib_file}, nsamples: 8, seqlen: 32}}\n"
                      "stages:\n  - prune: {method: sparsegpt, nm: '2:4'}\n  - gptq: {bits: 4, group_size: 32}\n")
    out = tmp_path / "q"
    assert main(["compress", str(tiny_folder("llama")), "--recipe", str(recipe), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["pruning"][0]["method"] == "sparsegpt"
    model, _ = load(str(out))
    assert sparsity_report(model)["nm"] == "2:4"  # GPTQ kept every zero of the pruned model
    assert main(["compress", str(tiny_folder("llama", name="again")), "--recipe", str(out / "recipe.yaml"),
                 "--out", str(tmp_path / "again")]) == 0  # the recipe inside reproduces it
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,nm", [(["--nm", "2:4"], "2:4"), (["--sparsity", "0.5"], None)])
def test_joint_sparse_gptq_in_one_pass(tiny_folder, tmp_path, calib_file, flags, nm, capsys):
    out = tmp_path / "joint"
    assert main(["quantize", str(tiny_folder("llama")), "--group-size", "32", *flags, *calib(calib_file),
                 "--out", str(out)]) == 0
    assert "sparse: 14 layers quantized" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["nm"] == nm and meta["act_group_aware"] is True  # GPTQModel's GAR, N:M runs kept whole
    assert meta["refit_iters"] == 20  # SparseGPT's mask, the exact refit, then GPTQ with the mask fixed
    model, _ = load(str(out))
    report = sparsity_report(model)
    # kept weights that round to their zero point are zeros too: a little above the target
    assert 0.5 <= report["sparsity"] < 0.56 and report["nm"] == nm
    for m in model.modules():
        if hasattr(m, "dequantized_weight") and nm:
            assert nm_holds(m.dequantized_weight(), 2, 4)


def test_depth_and_width_through_the_cli_then_gptq(tiny_folder, tmp_path, calib_file):
    src = tiny_folder("llama")
    assert main(["prune", str(src), "--method", "depth", "--drop-blocks", "1", "--importance", "kl",
                 *calib(calib_file), "--out", str(tmp_path / "d")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 1
    assert main(["prune", str(src), "--method", "width", "--mlp-keep", "0.5", "--heads-keep", "0.5",
                 *calib(calib_file), "--out", str(tmp_path / "w")]) == 0
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "w").config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 1)
    assert main(["quantize", str(tmp_path / "w"), "--group-size", "32", *calib(calib_file),
                 "--out", str(tmp_path / "wq")]) == 0  # it can be quantized next
    model, _ = load(str(tmp_path / "wq"))
    assert model.config.pruning[0]["method"] == "width"


def test_resume_after_crash_is_identical(tiny_folder, tmp_path, calib_file, monkeypatch):

    src = tiny_folder("llama")
    args = ["prune", str(src), "--method", "sparsegpt", "--sparsity", "0.5", *calib(calib_file)]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    BlockCrash(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "r")]) == 130
    assert main([*args, "--out", str(tmp_path / "r"), "--resume"]) == 0
    a, b = load_file(tmp_path / "clean" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_info_report_sparsity(tiny_folder, tmp_path, calib_file, capsys):
    out = tmp_path / "p"
    assert main(["prune", str(tiny_folder("llama")), "--method", "magnitude", "--nm", "2:4", "--out", str(out)]) == 0
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    assert main(["eval", str(out), "--ppl", str(text), "--seqlen", "32", "--no-progress",
                 "--output", str(tmp_path / "e.json")]) == 0
    assert "sparsity (block linears)" in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["sparsity"]["nm"] == "2:4" and result["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert result["size"]["parameters"] > 0
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sparsity"]["nm"] == "2:4" and info["pruning"][0]["method"] == "magnitude"


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_true_sequential_reads_the_pruned_groups(tiny_folder, tmp_path, calib_file, method):
    """--true-sequential prunes to the same count as the default (one forward of the block as it was,
    the reference code's way) but chooses from other inputs for every group after the first, so some
    later layer differs; the first group (q/k/v of block 0) sees the same input either way."""
    src = tiny_folder("llama")
    outs = {}
    for ts in (True, False):
        out = tmp_path / f"out-{ts}"
        flag = ["--true-sequential"] if ts else []
        assert main(["prune", str(src), "--method", method, "--sparsity", "0.5", *flag, *calib(calib_file),
                     "--out", str(out)]) == 0
        outs[ts] = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(outs[True][q], outs[False][q])
    later = [k for k in outs[True] if ".layers." in k and k.endswith("proj.weight") and "self_attn.q_proj" not in k]
    assert any(not torch.equal(outs[True][k], outs[False][k]) for k in later)
    for k in later:
        assert outs[False][k].eq(0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("flags,needle", [
    (["--method", "sparsegpt"], "needs --sparsity"),
    (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
    (["--sparsity", "0"], "needs --sparsity"),
    (["--sparsity", "-0.2"], "--sparsity must be in (0, 1)"),
    (["--nm", "4:4"], "N must be smaller than M"),
    (["--nm", "2-4"], "--nm must look like N:M"),
    (["--nm", "4:8", "ODD"], "M=8 does not divide the input size 100 of model.layers.0.mlp.down_proj"),
    (["--nm", "2:4", "--sparsity", "0.5"], "--nm and --sparsity exclude each other"),
    (["--method", "depth", "--drop-blocks", "2"], "at least one must remain"),
    (["--method", "depth", "--drop-blocks", "5"], "at least one must remain"),
    (["--method", "depth"], "needs --drop-blocks"),
    (["--method", "width", "--mlp-keep", "0"], "--mlp-keep must be in (0, 1]"),
    (["--method", "width", "--mlp-keep", "1.5"], "--mlp-keep must be in (0, 1]"),
    (["--method", "width", "--heads-keep", "0"], "--heads-keep must be in (0, 1]"),
    (["--method", "width"], "needs --mlp-keep and/or --heads-keep"),
    (["--method", "wanda", "--sparsity", "0.5", "--drop-blocks", "1"], "does not use --drop-blocks"),
    (["--method", "magnitude", "--sparsity", "0.5", "--nsamples", "16"], "reads no calibration data"),
    (["--method", "magnitude", "--sparsity", "0.5", "--true-sequential"], "does not use --true-sequential"),
    (["--method", "depth", "--drop-blocks", "1", "--exclude", "*.mlp.*"], "do not apply"),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--no-act-order"], "applies to N:M pruning (--nm) only"),
    (["--method", "wanda", "--nm", "2:4", "--no-act-order"], "does not use --act-order"),
    (["--sparsity", "0.5", "--refit-iters", "-1"], "--refit-iters must be a whole number >= 0"),
    (["--method", "magnitude", "--sparsity", "0.5", "--refit-iters", "5"], "does not use --refit-iters"),
    (["--method", "wanda", "--sparsity", "0.5", "--damp-percent", "0.1"], "--damp-percent applies to wanda only"),
])
def test_bad_input_one_line_exit_2(tiny_folder, tmp_path, calib_file, capsys, flags, needle):
    src, out = tiny_folder("llama"), tmp_path / "o"
    if "ODD" in flags:  # an MLP width of 100: not a multiple of 8
        from transformers import LlamaConfig, LlamaForCausalLM

        flags = [f for f in flags if f != "ODD"]
        LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(src)
    extra = [] if "magnitude" in flags else calib(calib_file)
    if "--nsamples" in flags:
        extra = []
    capsys.readouterr()
    assert main(["prune", str(src), *flags, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err  # (after progress bars of loading, for mistakes found in the model)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and needle in errors[0], err
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_joint_with_a_quantized_head_never_prunes_the_head(tiny_folder, tmp_path, calib_file):
    out = tmp_path / "joint-head"
    assert main(["quantize", str(tiny_folder("llama")), "--group-size", "32", "--nm", "2:4", "--quantize-lm-head",
                 *calib(calib_file), "--out", str(out)]) == 0
    model, _ = load(str(out))
    head = model.get_output_embeddings()
    assert head.dequantized_weight().eq(0).float().mean() < 0.2  # 4-bit zero points only, not half the weights


@pytest.mark.parametrize("flags,needle", [
    (["--nm", "2:4", "--sparsity", "0.5"], "--nm and --sparsity exclude each other"),
    (["--nm", "2:4", "--desc-act"], "--desc-act does not combine"),
    (["--method", "rtn", "--nm", "2:4"], "does not use --nm"),
    (["--sparsity", "1"], "--sparsity must be in (0, 1)"),
    (["--refit-iters", "5"], "--refit-iters applies to the joint sweep only"),
    (["--nm", "2:4", "--refit-iters", "-2"], "--refit-iters must be a whole number >= 0"),
    (["--method", "rtn", "--refit-iters", "5"], "does not use --refit-iters"),
])
def test_bad_joint_input(tiny_folder, tmp_path, capsys, flags, needle):
    src = tiny_folder("llama")
    capsys.readouterr()
    assert main(["quantize", str(src), *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_pruning_a_bitsandbytes_checkpoint_is_refused(tiny_folder, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    src = tiny_folder("llama")
    assert main(["quantize", str(src), "--method", "nf4", "--out", str(tmp_path / "nf4")]) == 0
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "nf4"), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "already quantized" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - nf4: {}\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    assert main(["compress", str(src), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "cannot follow" in capsys.readouterr().err


def test_eval_of_unpruned_quantized_model_does_not_call_its_zeros_sparsity(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    # 2-bit codes round many weights to exactly 0: zeros, but no pruning happened.
    assert main(["quantize", str(tiny_folder("llama")), "--method", "rtn", "--bits", "2", "--sym",
                 "--out", str(out)]) == 0
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    capsys.readouterr()
    assert main(["eval", str(out), "--ppl", str(text), "--seqlen", "32", "--no-progress",
                 "--output", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["sparsity"]["sparsity"] > 0 and result["sparsity"]["pruned"] is False
    assert "zero weights (not pruned)" in printed and "sparsity (block linears)" not in printed

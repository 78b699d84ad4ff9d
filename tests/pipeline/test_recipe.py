"""Recipes: parsing, every bad recipe (one line, exit 2, nothing written), ``compress`` = ``quantize``
byte for byte, and the recipe inside a checkpoint reproducing it."""

from __future__ import annotations

import hashlib
import json

import pytest

from llmslim.cli import main
from llmslim.config import BnbConfig, CalibConfig, GPTQConfig, LayerFilter, RTNConfig
from llmslim.errors import UserError
from llmslim.pipeline.recipe import Recipe, parse_recipe, read_recipe

GOOD = """
calibration: {dataset: wiki, nsamples: 128, seqlen: 512, seed: 0}
stages:
  - gptq: {bits: 4, group_size: 128, sym: true, desc_act: false}
"""


def test_the_documented_format(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    r = read_recipe(path)
    assert r == Recipe((GPTQConfig(bits=4, group_size=128, sym=True, desc_act=False),),
                       CalibConfig("wiki", 128, 512, 0))
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps({"calibration": {"dataset": "wiki", "nsamples": 128, "seqlen": 512, "seed": 0},
                                   "stages": [{"gptq": {"bits": 4, "group_size": 128}}]}))
    assert read_recipe(as_json) == r


def test_stage_names_are_method_names_and_keys_are_flags():
    r = parse_recipe({"stages": [{"rtn": {"bits": 8, "group_size": -1, "exclude": ["*.mlp.*"],
                                          "quantize_lm_head": True}}]})
    assert r.stages == (RTNConfig(bits=8, group_size=-1, layers=LayerFilter((), ("*.mlp.*",), True)),)
    r = parse_recipe({"stages": [{"nf4": {"double_quant": True}}, ]})
    assert r.stages == (BnbConfig("nf4", double_quant=True),)
    assert parse_recipe({"stages": ["int8"]}).stages == (BnbConfig("int8"),)
    assert parse_recipe({"stages": [{"gptq": None}]}).stages == (GPTQConfig(),)


def test_round_trip_through_yaml_keeps_every_field():
    r = Recipe((GPTQConfig(bits=3, group_size=64, desc_act=True, damp_percent=0.05,
                           layers=LayerFilter(include=("*.self_attn.*",))),), CalibConfig("code", 16, 64, 3))
    import yaml

    d = yaml.safe_load(r.to_yaml())
    assert d["stages"][0]["gptq"]["damp_percent"] == 0.05 and d["stages"][0]["gptq"]["act_group_aware"] is True
    d.pop("llmslim_version")
    assert parse_recipe(d) == r
    assert "calibration" not in Recipe((RTNConfig(),)).to_dict()  # RTN uses none: none is recorded


@pytest.mark.parametrize("data, message", [
    ([], "expected a mapping"),
    ({"stages": []}, "non-empty list"),
    ({"stage": [{"gptq": {}}]}, "unknown key 'stage'"),
    ({"stages": [{"gpqt": {}}]}, "stage 1: unknown stage 'gpqt'"),
    ({"stages": [{"gptq": {"bitz": 4}}]}, r"stage 1 \(gptq\): unknown key 'bitz'"),
    ({"stages": [{"gptq": {"bits": "4"}}]}, "bits must be an integer, got '4'"),
    ({"stages": [{"gptq": {"sym": "yes"}}]}, "sym must be true or false"),
    ({"stages": [{"gptq": {"group_size": 1.5}}]}, "group_size must be an integer"),
    ({"stages": [{"gptq": {"damp_percent": True}}]}, "damp_percent must be a number"),
    ({"stages": [{"rtn": {"exclude": "*.mlp.*"}}]}, "exclude must be a list of strings"),
    ({"stages": [{"nf4": {"quant_type": "fp4"}}]}, "unknown key 'quant_type'"),
    ({"stages": [{"gptq": {"bits": 5}}]}, "--bits must be one of"),
    ({"stages": [{"gptq": {}, "rtn": {}}]}, "stage 1 must be one"),
    ({"stages": [{"nf4": {}}, {"gptq": {"bits": 4}}]}, r"stage 2 \(gptq\) cannot follow stage 1 \(nf4\)"),
    ({"stages": [{"gptq": {}}, {"rtn": {}}]}, r"stage 2 \(rtn\) cannot follow stage 1 \(gptq\)"),
    ({"calibration": {"dataset": "wiki"}, "stages": [{"rtn": {}}]}, "no stage uses calibration"),
    ({"calibration": {"nsample": 8}, "stages": [{"gptq": {}}]}, "calibration: unknown key 'nsample'"),
    ({"calibration": {"nsamples": 0}, "stages": [{"gptq": {}}]}, "--nsamples must be positive"),
    ({"stages": [{"gptq": {"forward_dtype": "fp16"}}]}, "--forward-dtype must be one of auto, fp32, bf16"),
    ({"stages": [{"gptq": {"forward_dtype": 16}}]}, "forward_dtype must be a string"),
    ({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5, "forward_dtype": "bf16"}}]},
     "does not use --forward-dtype"),
])
def test_bad_recipes_are_named(data, message):
    with pytest.raises(UserError, match=message):
        parse_recipe(data)


def test_bad_recipe_files_on_the_command_line(tiny_folder, tmp_path, capsys):
    src = tiny_folder("llama")
    capsys.readouterr()
    cases = {"missing.yaml": None, "broken.yaml": "stages: [gptq: {bits: 4}\n", "broken.json": "{",
             "order.yaml": "stages:\n  - int8: {}\n  - rtn: {bits: 4}\n"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        out = tmp_path / f"out-{name}"
        assert main(["compress", str(src), "--recipe", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not out.exists() and not (tmp_path / f".out-{name}.partial").exists()


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "quant_log.json"}  # the log holds wall times


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                for i in range(200)))
    return path


@pytest.mark.parametrize("flags, stage", [
    (["--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "32", "--desc-act"],
     {"gptq": {"bits": 4, "group_size": 32, "desc_act": True}}),
    (["--method", "rtn", "--bits", "3", "--group-size", "32"], {"rtn": {"bits": 3, "group_size": 32}}),
    (["--method", "nf4", "--double-quant"], {"nf4": {"double_quant": True}}),
])
def test_compress_equals_quantize_and_reproduces_itself(tiny_folder, tmp_path, calib_file, flags, stage):
    src = tiny_folder("llama")
    calibrated = "gptq" in stage
    if calibrated:
        flags = [*flags, "--calib", str(calib_file)]
    assert main(["quantize", str(src), "--out", str(tmp_path / "q"), *flags]) == 0
    recipe = {"stages": [stage]}
    if calibrated:
        recipe["calibration"] = {"dataset": str(calib_file), "nsamples": 8, "seqlen": 32}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert main(["compress", str(src), "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "c")]) == 0
    quantized, compressed = _digest(tmp_path / "q"), _digest(tmp_path / "c")
    assert "recipe.yaml" in quantized and "model.safetensors" in quantized
    assert quantized == compressed
    # Provenance: the checkpoint's own recipe.yaml makes the same checkpoint again.
    assert main(["compress", str(src), "--recipe", str(tmp_path / "q" / "recipe.yaml"),
                 "--out", str(tmp_path / "again")]) == 0
    assert _digest(tmp_path / "again") == quantized
    text = (tmp_path / "q" / "recipe.yaml").read_text()
    assert text.startswith("llmslim_version: ") and ("calibration:" in text) == calibrated


def test_the_log_records_every_stage(tiny_folder, tmp_path, calib_file):
    from llmslim.pipeline.run import compress_to_folder

    src = tiny_folder("llama")
    recipe = Recipe((GPTQConfig(bits=4, group_size=32),), CalibConfig(str(calib_file), 8, 32))
    s = compress_to_folder(str(src), recipe, tmp_path / "one")
    assert [x["stage"] for x in s["stages"]] == ["gptq"] and len(s["layers"]) == 14
    log = json.loads((tmp_path / "one" / "quant_log.json").read_text())
    assert log["config"]["bits"] == 4 and log["calibration"]["nsamples"] == 8


# --- an export stage that cannot hold the grid before it (issue 15): refused before any work ---------

@pytest.mark.parametrize("stage", [
    {"gptq": {"group_size": 128}},  # whole blocks of 32 inside each group share its scale: Q4_0 holds it
    {"gptq": {"bits": 2, "group_size": 64}},
    {"gptq": {"group_size": -1, "desc_act": True}},  # one group per row: act-order changes nothing
    {"gptq": {"group_size": 32, "desc_act": True, "static_groups": True}},
    {"gptq": {"target": "gguf-q4_0"}},
    {"tune": {"budget": "bpw=3.5", "candidates": ["4:32", "3:64", "2:128"]}},
])
def test_export_after_a_grid_it_holds_is_accepted(stage):
    parse_recipe({"stages": [stage, "recover", {"export": {"type": "q4_0"}}]})


@pytest.mark.parametrize("stage, kind, problem, fix", [
    ({"gptq": {"group_size": 16}}, "q4_0", "groups of 16 split", "target: gguf-q4_0"),
    ({"rtn": {"bits": 8, "group_size": 32}}, "q4_0", r"\[-8, 7\].*\[-128, 127\]", "target: gguf-q4_0"),
    ({"gptq": {"sym": False, "group_size": 32}}, "q4_0", "asymmetric", "target: gguf-q4_0"),
    ({"gptq": {"group_size": 32, "desc_act": True}}, "q8_0", "act-order", "target: gguf-q8_0"),
    ({"gptq": {"overrides": ["model.layers.0.mlp.down_proj=8:64"]}}, "q4_0", "8-bit", "target: gguf-q4_0"),
    ({"gptq": {"target": "gguf-q8_0"}}, "q4_0", "8-bit", "target: gguf-q4_0"),
    ({"gptq": {"target": "gguf-q4_k_m"}}, "q4_0", "only q4_k_m holds", "target: gguf-q4_0"),
    ({"gptq": {}}, "q4_k_m", "not as Q4_K_M", "target: gguf-q4_k_m"),
    ({"rtn": {}}, "q4_k_m", "not as Q4_K_M", "drop stage 1"),
    ({"gptq": {}}, "f16", "would round", "export as f32"),
    ({"tune": {"budget": "bpw=3.5"}}, "q4_0", "8-bit", "only candidates that q4_0 holds"),
])
def test_export_after_a_grid_it_cannot_hold_is_refused_up_front(stage, kind, problem, fix):
    with pytest.raises(UserError, match=rf"recipe stage 3 \(export {kind}\) cannot write stage 1 .*{problem}.*{fix}"):
        parse_recipe({"stages": [stage, "recover", {"export": {"type": kind}}]})


def test_the_refusal_comes_before_loading_or_computing(tiny_folder, tmp_path, capsys, monkeypatch):
    """``compress`` with gptq at group size 16 then export q4_0, and ``export`` of such a checkpoint: one
    line, exit 2, before a model is loaded or a block solved, and nothing written."""
    import llmslim.pipeline.run as run
    import llmslim.pipeline.stages as stages

    src = tiny_folder("llama")
    g16 = tmp_path / "g16"
    assert main(["quantize", str(src), "--method", "rtn", "--group-size", "16", "--out", str(g16)]) == 0
    (tmp_path / "r.yaml").write_text("stages: [{gptq: {group_size: 16}}, {export: {type: q4_0}}]\n")
    calls = []
    for module, name in ((run, "load_hf"), (run, "load"), (stages, "gptq_blocks"),
                         (stages, "rtn_layers")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n))
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "m.gguf"
    for argv, needle in (
        (["compress", str(src), "--recipe", str(tmp_path / "r.yaml")], "give stage 1 target: gguf-q4_0"),
        (["quantize", str(src), "--group-size", "16", "--target", "gguf-q4_0"], "drop --group-size 16"),
        (["export", str(g16), "--type", "q4_0"], "groups of 16 split those blocks; re-fit on it"),
        (["export", str(g16), "--type", "q5_0"], "export the original float model as q5_0"),
    ):
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (argv, err)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == before


def test_checkpoint_grid_problem_reads_every_dynamic_grid():
    from llmslim.formats.gguf import checkpoint_grid_problem

    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    assert checkpoint_grid_problem(qc, "q4_0") is None and checkpoint_grid_problem(qc, "q8_0") is None
    assert "8-bit" in checkpoint_grid_problem(qc | {"dynamic": {"+:^a$": {"bits": 8}}}, "q4_0")
    assert checkpoint_grid_problem(qc | {"dynamic": {"-:^a$": {}}}, "q4_0") is None  # skipped: stays float
    assert "act-order" in checkpoint_grid_problem(qc | {"desc_act": True}, "q4_0")
    assert checkpoint_grid_problem(qc | {"desc_act": True, "static_groups": True}, "q4_0") is None

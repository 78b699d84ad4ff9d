"""Everything in ``llmslim.__all__`` works however often and in whatever order it is used.

Run in a fresh interpreter: importing a submodule named like a function (``llmslim.load`` was one)
replaces the package attribute, which only shows when nothing else imported it first.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r'''
import sys
import torch
import llmslim
from tests.conftest import make_tiny_model, make_tiny_tokenizer

folder, calib_file, out = sys.argv[1:4]
assert set(llmslim.__all__) >= {"load", "quantize", "compress", "Recipe", "GPTQConfig"}
tok = make_tiny_tokenizer()
tokens = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
for round_ in range(2):
    assert llmslim.__version__
    model, tokenizer = llmslim.load(folder)           # the function, every time
    import llmslim.loader, llmslim.pipeline.run       # noqa: E401  importing submodules changes nothing
    assert callable(llmslim.load) and callable(llmslim.compress) and callable(llmslim.quantize)
    layers = llmslim.LayerFilter(exclude=("*.mlp.*",))
    cal = llmslim.CalibConfig(calib_file, nsamples=4, seqlen=16)
    report = llmslim.quantize(make_tiny_model("llama"), llmslim.RTNConfig(bits=4, group_size=32, layers=layers))
    assert len(report.layers) == 8, report.layers
    report = llmslim.quantize(make_tiny_model("llama"), llmslim.GPTQConfig(bits=4, group_size=32), calib=tokens)
    assert len(report.layers) == 14
    recipe = llmslim.Recipe((llmslim.GPTQConfig(bits=4, group_size=32),), cal)
    assert llmslim.parse_recipe(recipe.to_dict()) == recipe
    m, reports = llmslim.compress(make_tiny_model("llama"), recipe, tokenizer=tok)
    assert reports[0].stage == "gptq"
    m, reports = llmslim.compress(make_tiny_model("llama"), llmslim.Recipe((llmslim.BnbConfig("nf4"),)))
    assert type(m.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    s = llmslim.quantize_to_folder(folder, f"{out}/q{round_}", llmslim.RTNConfig(bits=8))
    s = llmslim.compress_to_folder(folder, recipe, f"{out}/c{round_}")
    r = llmslim.read_recipe(f"{out}/c{round_}/recipe.yaml")
    assert r == recipe, (r, recipe)
    try:
        llmslim.GPTQConfig(bits=5)
    except llmslim.UserError:
        pass
    else:
        raise AssertionError("bits=5 accepted")
print("ok")
'''


def test_every_public_entry_twice(tiny_folder, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(80)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_folder("llama")), str(calib), str(tmp_path)],
                       capture_output=True, text=True, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

"""Every example recipe shipped in calibration/recipes/ parses, and runs on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmslim.pipeline.recipe import read_recipe
from llmslim.pipeline.run import compress_to_folder
from tests.formats.test_gguf import spm_folder  # noqa: F401  (a fixture: a folder llama.cpp's converter reads)

RECIPES = sorted((Path(__file__).parents[2] / "calibration" / "recipes").glob("*.yaml"))


def test_there_are_examples():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_example_recipe_runs(path, tiny_folder, spm_folder, tmp_path):  # noqa: F811
    recipe = read_recipe(path)
    if recipe.calibrated:  # the tiny model's context is short and its vocabulary tiny: shrink, keep the text
        from dataclasses import replace

        recipe = replace(recipe, calibration=replace(recipe.calibration, nsamples=4, seqlen=64))
    if any(s.stage in ("nf4", "fp4", "int8") for s in recipe.stages):
        pytest.importorskip("bitsandbytes")
    if recipe.stages[-1].stage == "export":  # one GGUF file, the recipe inside it
        import gguf

        out = tmp_path / "out.gguf"
        s = compress_to_folder(str(spm_folder("llama")), recipe, out)
        fields = gguf.GGUFReader(out).fields
        assert s["layers"] and "llmslim.recipe" in fields
        return
    s = compress_to_folder(str(tiny_folder("llama")), recipe, tmp_path / "out")
    assert s["layers"] and (tmp_path / "out" / "recipe.yaml").exists()

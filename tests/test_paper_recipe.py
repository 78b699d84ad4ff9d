"""The GPTQ-paper reproduction (eval/reproduce_gptq_paper.sh) needs the hub; its pieces run here
offline: the same CLI flags on a tiny OPT, with `datasets.load_dataset` serving synthetic c4 and
wikitext2 records in their real schemas."""

import re
import shlex
from pathlib import Path

import pytest

from llmslim.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "reproduce_gptq_paper.sh"


@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    words = "the of and to in a is was for on that with as by at from his an were are which".split()

    def load_dataset(path, name=None, split=None, data_files=None, **kw):
        calls.append((path, name, split, data_files))
        if "c4" in path:
            docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(400)) for i in range(60)]
            return datasets.Dataset.from_dict({"text": docs, "timestamp": [""] * 60, "url": [""] * 60})
        lines = ["", " = Title = ", ""] + [" ".join(words[(i + j) % len(words)] for j in range(50)) for i in range(300)]
        return datasets.Dataset.from_dict({"text": lines})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def script_flags() -> list[str]:
    text = SCRIPT.read_text()
    return shlex.split(re.search(r"common=\((.*?)\)", text, re.S).group(1))


def test_script_uses_the_paper_setup():
    flags = script_flags()
    assert flags[flags.index("--group-size") + 1] == "-1"  # per-channel
    assert "--asym" in flags and "--no-true-sequential" in flags and "--desc-act" not in flags
    assert flags[flags.index("--calib") + 1] == "c4" and flags[flags.index("--nsamples") + 1] == "128"
    assert flags[flags.index("--seqlen") + 1] == "2048"
    assert "--ppl wikitext2 --ppl-method gptq --seqlen 2048" in SCRIPT.read_text()


def test_recipe_runs_on_tiny_opt(tiny_folder, tmp_path, fake_hub):
    src = tiny_folder("opt")
    flags = [f for f in script_flags() if f != "--force"]
    flags[flags.index("--nsamples") + 1] = "8"
    flags[flags.index("--seqlen") + 1] = "128"  # the tiny model's context is 256
    out = tmp_path / "q"
    assert main(["quantize", str(src), *flags, "--bits", "4", "--out", str(out)]) == 0
    assert any("c4" in c[0] and c[2] == "train" for c in fake_hub)
    assert main(["eval", str(out), "--ppl", "wikitext2", "--ppl-method", "gptq", "--seqlen", "128",
                 "--output", str(tmp_path / "r.json")]) == 0
    assert any("wikitext" in c[0] and c[2] == "test" for c in fake_hub)
    import json

    r = json.dumps(json.loads((tmp_path / "r.json").read_text()))
    assert '"method": "gptq"' in r and '"seqlen": 128' in r

"""``llmslim recover`` and the ``recover`` recipe stage on tiny models: the output is a checkpoint of
the input's own format that loads where the input did, the recipe reproduces it, every bad input is
one line with exit 2, and a killed run resumes to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmslim.cli import main
from llmslim.errors import UserError
from llmslim.loader import load
from llmslim.nn import GPTQLinear
from llmslim.pipeline.recipe import parse_recipe, read_recipe
from llmslim.pipeline.run import compress_to_folder

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                for i in range(200)))
    return path


def tensors(folder: Path) -> dict[str, tuple]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "quant_log.json"}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and "Writing model" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_recipe_gptq_then_recover_keeps_the_format_and_reproduces(tiny_folder, tmp_path, calib_file):
    src = tiny_folder("llama")
    calibration = {"dataset": str(calib_file), "nsamples": 8, "seqlen": 32}
    gptq = {"gptq": {"bits": 2, "group_size": 32}}
    compress_to_folder(str(src), parse_recipe({"calibration": calibration, "stages": [gptq]}), tmp_path / "gptq")
    recipe = parse_recipe({"calibration": calibration, "stages": [gptq, {"recover": {"iters": 4, "batch_size": 4}}]})
    s = compress_to_folder(str(src), recipe, tmp_path / "rec")
    out = tmp_path / "rec"
    assert s["stages"][1]["recover"]["mode"] == "block" and len(s["stages"][1]["layers"]) == 2
    assert tensors(out) == tensors(tmp_path / "gptq")  # the same GPTQ v1 tensors, names, shapes and dtypes
    assert qconfig(out) == qconfig(tmp_path / "gptq")
    model, _ = load(str(out))
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14
    assert [next(iter(st)) for st in read_recipe(out / "recipe.yaml").to_dict()["stages"]] == ["gptq", "recover"]
    again = tmp_path / "again"
    compress_to_folder(str(src), read_recipe(out / "recipe.yaml"), again)
    assert digest(again) == digest(out)  # the checkpoint's own recipe makes it again, byte for byte
    assert main(["info", str(out)]) == 0


def test_recipe_order_and_calibration():
    with pytest.raises(UserError, match="cannot follow"):
        parse_recipe({"stages": ["nf4", "recover"]})
    with pytest.raises(UserError, match="does not use --tokens"):
        parse_recipe({"stages": ["gptq", {"recover": {"tokens": 100}}]})
    r = parse_recipe({"stages": ["gptq", "recover", {"export": {"type": "q4_0"}}]})  # recover keeps "gptq"
    assert r.calibrated and [s.stage for s in r.stages] == ["gptq", "recover", "export"]
    r = parse_recipe({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"recover": {"mode": "e2e"}}]})
    assert not r.calibrated  # e2e reads its own --data


def test_cli_recover_block_then_e2e_keep_the_students_format(tiny_folder, tmp_path, calib_file, capsys):
    src = tiny_folder("llama")
    q = tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "2", "--group-size", "32", "--calib", str(calib_file),
                 "--nsamples", "8", "--seqlen", "32", "--out", str(q)]) == 0
    rec = tmp_path / "rec"
    assert main(["recover", str(q), "--teacher", str(src), "--out", str(rec), "--iters", "4", "--batch-size", "4"]) == 0
    assert "blocks improved" in capsys.readouterr().out
    assert tensors(rec) == tensors(q)
    qc_in, qc_out = qconfig(q), qconfig(rec)
    assert qc_out.pop("meta").pop("recover") == "block" and {**qc_in, "meta": None} == {**qc_out, "meta": None}
    log = json.loads((rec / "quant_log.json").read_text())
    assert log["calibration"]["dataset"] == str(calib_file)  # the student's own calibration by default
    assert log["source"] == str(src)
    made = read_recipe(rec / "recipe.yaml")
    assert [s.stage for s in made.stages] == ["gptq", "recover"] and made.calibration.nsamples == 8

    e2e = tmp_path / "e2e"
    assert main(["recover", str(rec), "--teacher", str(src), "--out", str(e2e), "--mode", "e2e", "--data",
                 str(calib_file), "--tokens", "256", "--seqlen", "32", "--batch-size", "4"]) == 0
    assert "validation KL" in capsys.readouterr().out
    a, _ = load(str(rec))
    b, _ = load(str(e2e))
    qa = {n: m for n, m in a.named_modules() if isinstance(m, GPTQLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, GPTQLinear)}
    assert qa.keys() == qb.keys() and all(torch.equal(qa[n].qweight, qb[n].qweight) for n in qa)  # codes kept
    assert qconfig(e2e)["meta"]["recover"] == "e2e"


def test_cli_full_range_round_to_nearest_then_recover_follow(tiny_folder, tmp_path, calib_file, capsys):
    """AutoRound's recipe through the CLI: RTN on the full-range grid, then block recovery whose codes
    follow the learned scale; both options are recorded in the recipe and the signed scales survive."""
    src = tiny_folder("llama")
    q = tmp_path / "q"
    assert main(["quantize", str(src), "--method", "rtn", "--bits", "3", "--group-size", "32", "--full-range",
                 "--out", str(q)]) == 0
    assert "rtn 3-bit g32 sym full-range:" in capsys.readouterr().out  # the summary names the grid
    rec = tmp_path / "rec"
    assert main(["recover", str(q), "--teacher", str(src), "--out", str(rec), "--iters", "4", "--batch-size", "4",
                 "--data", str(calib_file), "--tokens", "256", "--seqlen", "32", "--follow"]) == 0
    made = read_recipe(rec / "recipe.yaml")
    assert [s.stage for s in made.stages] == ["rtn", "recover"]
    assert made.stages[0].full_range and made.stages[1].follow
    assert tensors(rec) == tensors(q)
    a, b = load_file(q / "model.safetensors"), load_file(rec / "model.safetensors")
    scales = [k for k in a if k.endswith(".scales")]
    assert scales and all(torch.equal(torch.sign(a[k]), torch.sign(b[k])) for k in scales)
    assert any((a[k] < 0).any() for k in scales)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith((".qweight", ".scales")))


def test_cli_recover_e2e_depth_pruned_student_with_lora(tiny_folder, tmp_path, calib_file):
    src = tiny_folder("llama")
    pruned = tmp_path / "depth"
    assert main(["prune", str(src), "--method", "depth", "--drop-blocks", "1", "--calib", str(calib_file),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(pruned)]) == 0
    out = tmp_path / "rec"
    args = ["recover", str(pruned), "--teacher", str(src), "--out", str(out), "--data", str(calib_file), "--tokens",
            "256", "--seqlen", "32", "--batch-size", "4"]
    assert main([*args, "--mode", "block"]) == 2  # block mode needs the teacher's structure
    assert main([*args, "--mode", "e2e", "--lora-rank", "4"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["pruning"][0]["method"] == "depth"
    assert "quantization_config" not in cfg
    model, _ = load(str(out))
    assert not any("lora" in k or k.endswith(".A") for k in model.state_dict())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The original, its 2-bit GPTQ student, an unrelated model's GPTQ checkpoint, and a teacher with
    another vocabulary (made once for all the bad-input cases)."""
    import transformers as T

    from tests.conftest import make_tiny_model, make_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("recover-inputs")
    calib = tmp / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                  for i in range(200)))
    common = ["--bits", "2", "--group-size", "32", "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    for name, seed in (("src", 0), ("other", 5)):
        make_tiny_model("llama", seed=seed).save_pretrained(tmp / name)
        make_tiny_tokenizer().save_pretrained(tmp / name)
    assert main(["quantize", str(tmp / "src"), *common, "--out", str(tmp / "q")]) == 0
    assert main(["quantize", str(tmp / "other"), *common, "--out", str(tmp / "q-other")]) == 0
    tok = make_tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(tmp / "vocab")
    T.AutoModelForCausalLM.from_config(T.LlamaConfig(vocab_size=321, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     num_key_value_heads=2)).save_pretrained(tmp / "vocab")
    (tmp / "empty.txt").write_text("")
    return {"src": tmp / "src", "q": tmp / "q", "q-other": tmp / "q-other", "vocab": tmp / "vocab",
            "empty": tmp / "empty.txt", "calib": calib}


@pytest.mark.parametrize("case,needle", [
    ("lr0", "--lr must be positive"),
    ("lr-negative", "--lr must be positive"),
    ("tokens0", "--tokens must be positive"),
    ("temperature-in-block", "does not use --temperature"),
    ("iters-in-e2e", "does not use --iters"),
    ("vocabulary", "different tokenizers"),
    ("not-compressed", "not a compressed version"),
    ("teacher-quantized", "teacher"),
    ("float-student-block", "neither"),
    ("empty-data", "has 0 tokens"),
    ("unknown-data", "unknown data source"),
])
def test_bad_inputs_are_one_line_exit_2(folders, tmp_path, capsys, case, needle):
    f = folders
    out = tmp_path / "out"
    base = ["recover", str(f["q"]), "--teacher", str(f["src"]), "--out", str(out), "--iters", "2"]
    e2e = ["recover", str(f["q"]), "--teacher", str(f["src"]), "--out", str(out), "--mode", "e2e", "--tokens", "64",
           "--seqlen", "16"]
    args = {
        "lr0": [*base, "--lr", "0"],
        "lr-negative": [*base, "--lr=-1e-3"],
        "tokens0": [*e2e, "--tokens", "0"],
        "temperature-in-block": [*base, "--temperature", "2"],
        "iters-in-e2e": [*e2e, "--data", str(f["calib"]), "--iters", "5"],
        "vocabulary": ["recover", str(f["q"]), "--teacher", str(f["vocab"]), "--out", str(out)],
        "not-compressed": ["recover", str(f["q-other"]), "--teacher", str(f["src"]), "--out", str(out), "--iters", "2"],
        "teacher-quantized": ["recover", str(f["q"]), "--teacher", str(f["q"]), "--out", str(out)],
        "float-student-block": ["recover", str(f["src"]), "--teacher", str(f["src"]), "--out", str(out), "--iters", "2",
                                "--data", str(f["calib"])],
        "empty-data": [*e2e, "--data", str(f["empty"])],
        "unknown-data": [*e2e, "--data", "no-such-corpus"],
    }[case]
    capsys.readouterr()
    assert main(args) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmslim.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # an uninterrupted run, a killed one and its resume, each a fresh interpreter
@pytest.mark.parametrize("mode", ["e2e", "block"])
def test_killed_recover_resumes_to_the_same_bytes(tiny_folder, tmp_path, calib_file, mode):
    src = tiny_folder("llama")
    q = tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "2", "--group-size", "32", "--calib", str(calib_file),
                 "--nsamples", "8", "--seqlen", "32", "--out", str(q)]) == 0
    if mode == "e2e":
        args = ["recover", q, "--teacher", src, "--mode", "e2e", "--data", calib_file, "--tokens", "12800",
                "--seqlen", "32", "--batch-size", "4", "--checkpoint-every", "5"]
        marker = "e2e.safetensors"
    else:
        args = ["recover", q, "--teacher", src, "--iters", "300", "--batch-size", "4"]
        marker = "block_0000.safetensors"
    clean = cli(*args, "--out", tmp_path / "clean")
    _, err = clean.communicate(timeout=900)
    assert clean.returncode == 0, err[-2000:]
    out = tmp_path / "resumed"
    p = cli(*args, "--out", out)
    state = tmp_path / ".resumed.partial" / "_state" / "recover" / marker
    deadline = time.monotonic() + 600
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before its first checkpoint"
    time.sleep(0.5)  # somewhere between two checkpoints
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert not out.exists()
    resumed = cli(*args, "--out", out, "--resume")
    stdout, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming:" in stdout + err
    assert digest(out) == digest(tmp_path / "clean")

"""The pipeline under faults: full disk, read-only or impossible output, corrupt input, SIGINT,
SIGKILL. Each ends in one line and a documented exit code (2 user mistake, 1 write failure, 130
interrupted), and never in a folder that looks complete; a killed GPTQ run resumes to the same bytes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmslim.cli import main

ROOT = Path(__file__).parents[2]


def cli(*args, runner: tuple[str, ...] = ("-m", "llmslim.cli"), **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *runner, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            **kw)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "quant_log.json"}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and "Writing model" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """Factory for a real tmpfs mounted under tmp_path (root can mount one here and in CI)."""
    mounts = []

    def make(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the simulated variant still runs")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


def test_disk_full_is_one_line_exit_1_and_resumable(tiny_folder, tmpfs, capsys):
    src = tiny_folder("llama")
    capsys.readouterr()
    full = tmpfs("full", "size=48k")
    out = full / "out"
    assert main(["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "--resume" in line
    assert not out.exists()


def test_write_failure_simulated(tiny_folder, tmp_path, capsys, monkeypatch):
    """The same path without a mount: the checkpoint writer raises ENOSPC."""
    import errno

    from llmslim.pipeline import run

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = tiny_folder("llama")
    monkeypatch.setattr(run, "save_gptq", no_space)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out)]) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and (tmp_path / ".out.partial").exists()


def test_read_only_or_impossible_output_fails_before_any_work(tiny_folder, tmp_path, tmpfs, capsys):
    src = tiny_folder("llama")
    (tmp_path / "a-file").write_text("x")
    capsys.readouterr()
    for out, needle in [(tmp_path / "a-file" / "out", "is not a folder")]:
        assert main(["quantize", str(src), "--method", "rtn", "--out", str(out)]) == 2
        assert needle in one_error_line(capsys.readouterr().err)
    ro = tmpfs("ro", "ro")
    assert main(["quantize", str(src), "--method", "rtn", "--out", str(ro / "sub" / "out")]) == 2
    assert "not writable" in one_error_line(capsys.readouterr().err)


def test_truncated_and_corrupt_inputs(tiny_folder, tmp_path, capsys):
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("garbage", lambda b: b"\x00" * 64 + b[64:])]:
        src = tiny_folder("llama", name=name)
        weights = src / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        capsys.readouterr()
        out = tmp_path / f"out-{name}"
        assert main(["quantize", str(src), "--method", "rtn", "--out", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "corrupt" in line or "unreadable" in line, line
        assert not out.exists() and not (tmp_path / f".out-{name}.partial").exists()


@pytest.fixture
def deep_folder(tmp_path):
    """A 12-block tiny Llama: long enough that a signal lands between two blocks."""
    import torch
    import transformers as T

    from tests.conftest import make_tiny_tokenizer

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path / "deep"
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times."
                                 for i in range(400)))
    return path, calib


# The real CLI, paused for a minute once block 0 is checkpointed: the test's signal lands between two
# blocks however loaded the machine is (unpaused, the 11 blocks left take about a second, and a
# watcher starved that long saw the run finish first).
PAUSED_AFTER_BLOCK_0 = """
import sys, time
from llmslim.cli import main
import llmslim.quant.sequential as seq
save_block = seq.BlockState.save_block
def paused(self, i, *args, **kwargs):
    save_block(self, i, *args, **kwargs)
    if i == 0:
        time.sleep(60)
seq.BlockState.save_block = paused
sys.exit(main(sys.argv[1:]))
"""


def _kill_after_first_block(src: Path, calib: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Run GPTQ into ``out`` and send ``sig`` once block 0 is checkpointed."""
    args = ["quantize", src, "--method", "gptq", "--bits", "4", "--group-size", "32", "--desc-act",
            "--no-act-group-aware", "--calib", calib, "--nsamples", "16", "--seqlen", "128", "--out", out]
    p = cli(*args, runner=("-c", PAUSED_AFTER_BLOCK_0))
    # hidden.safetensors is written after each block's tensors: its presence means a block is done.
    first = out.parent / f".{out.name}.partial" / "_state" / "stage_0" / "hidden.safetensors"
    deadline = time.monotonic() + 300
    while not first.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the run ended before the first block was checkpointed"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert not out.exists(), "a killed run must not leave a folder that looks complete"
    return subprocess.CompletedProcess(args, p.returncode, stdout, stderr)


@pytest.mark.slow  # three 12-block GPTQ runs and two resumes: minutes on 2 cores
def test_killed_gptq_resumes_to_the_same_bytes(deep_folder, tmp_path):
    """kill -9 and Ctrl-C mid-GPTQ, each followed by --resume: the same bytes as a run never interrupted."""
    src, calib = deep_folder
    args = ["quantize", src, "--method", "gptq", "--bits", "4", "--group-size", "32", "--desc-act",
            "--no-act-group-aware", "--calib", calib, "--nsamples", "16", "--seqlen", "128"]
    clean = cli(*args, "--out", tmp_path / "clean")
    _, err = clean.communicate(timeout=600)
    assert clean.returncode == 0, err[-2000:]
    for sig, code in [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)]:
        out = tmp_path / f"resumed-{sig}"
        killed = _kill_after_first_block(src, calib, out, sig)
        assert killed.returncode == code, killed.stderr[-2000:]
        if sig == signal.SIGINT:
            assert "--resume" in killed.stderr and "Traceback" not in killed.stderr, killed.stderr[-2000:]
        refused = cli(*args, "--out", out)
        _, err = refused.communicate(timeout=600)
        assert refused.returncode == 2 and "--resume" in err  # no silent restart over a half-done run
        resumed = cli(*args, "--out", out, "--resume")
        stdout, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-2000:]
        assert "resuming:" in stdout + err, (stdout, err[-1000:])
        assert digest(out) == digest(tmp_path / "clean")

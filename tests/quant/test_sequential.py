"""The block driver's default calibration split: reproducible whatever memory is free now."""

from __future__ import annotations

import llmslim.quant.sequential as seq
from llmslim.quant.sequential import default_batch_size


def _free(monkeypatch, free: float, total: float) -> None:
    monkeypatch.setattr(seq, "available_memory_bytes", lambda: free)
    monkeypatch.setattr(seq, "total_memory_bytes", lambda: total)


def test_split_does_not_follow_free_memory(monkeypatch):
    sizes = []
    for free in (20e9, 16e9, 13e9):  # a busy machine and an idle one, same total
        _free(monkeypatch, free, 24e9)
        sizes.append(default_batch_size(128, 2048, 1536, None, log=lambda m: None))
    assert len(set(sizes)) == 1 and 1 < sizes[0] < 128, sizes


def test_explicit_budget_decides_alone(monkeypatch):
    _free(monkeypatch, 1e9, 24e9)
    assert default_batch_size(128, 2048, 1536, 8e9, log=print) == seq.auto_batch_size(128, 2048, 1536, 4e9)


def test_too_little_free_lowers_and_says_so(monkeypatch):
    _free(monkeypatch, 2e9, 24e9)
    said = []
    n = default_batch_size(128, 2048, 1536, None, log=said.append)
    assert n < default_batch_size(128, 2048, 1536, 12e9, log=said.append)
    assert len(said) == 1 and "--batch-size" in said[0], said


def test_small_calibration_runs_at_once(monkeypatch):
    _free(monkeypatch, 20e9, 24e9)
    assert default_batch_size(8, 256, 1536, None, log=print) == 8

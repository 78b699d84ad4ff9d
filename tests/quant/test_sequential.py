"""The block driver: a default calibration split that is the same on every machine, and one forward
per block (batches waiting inside it, ``_Lanes``) with the same bytes however many batches wait."""

from __future__ import annotations

import threading

import pytest
import torch

import llmslim.quant.sequential as seq
from llmslim.config import GPTQConfig, PruneConfig
from llmslim.quant.sequential import default_batch_size, gptq_blocks
from tests.conftest import make_tiny_model


def _free(monkeypatch, free: float) -> None:
    monkeypatch.setattr(seq, "available_memory_bytes", lambda: free)


def test_split_follows_neither_free_memory_nor_the_machine(monkeypatch):
    sizes = []
    for free in (200e9, 20e9, 13e9, 4e9):  # big and small machines, busy and idle
        _free(monkeypatch, free)
        sizes.append(default_batch_size(128, 512, 1536, None, log=lambda m: None))
    # SmolLM2-135M's widest layer at 512 tokens: 25 MB a sample by the estimate, 5 in 128 MiB.
    assert sizes == [5] * 4 == [seq.auto_batch_size(128, 512, 1536, seq.BATCH_BYTES)] * 4


def test_explicit_budget_lowers_never_raises(monkeypatch):
    _free(monkeypatch, 1e9)
    assert default_batch_size(128, 512, 1536, 8e9, log=print) == 5
    assert default_batch_size(128, 512, 1536, 1e8, log=print) == seq.auto_batch_size(128, 512, 1536, 5e7) == 1


def test_too_little_free_lowers_and_says_so(monkeypatch):
    _free(monkeypatch, 1e8)
    said = []
    assert default_batch_size(128, 512, 1536, None, log=said.append) == 1
    assert len(said) == 1 and "--batch-size 5" in said[0], said


def test_small_calibration_runs_at_once(monkeypatch):
    _free(monkeypatch, 20e9)
    assert default_batch_size(8, 256, 1536, None, log=print) == 8


CALIB = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
# Tiny Llama (hidden 64, MLP 128), batches of 2 x 32 tokens: a waiting forward ~82 KB by the estimate.
PER_BATCH = 2 * 32 * (3 * 64 + 128) * 4


def _held_counts(monkeypatch) -> list[int]:
    counts = []
    real = seq._Lanes.__init__

    def record(self, n, held):
        counts.append(held)
        real(self, n, held)

    monkeypatch.setattr(seq._Lanes, "__init__", record)
    return counts


@pytest.mark.parametrize("forward_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["gptq", "sparsegpt"])
def test_same_bytes_however_many_batches_wait(monkeypatch, method, forward_dtype):
    """All 4 batches waiting inside the block's forward, 2 of them, or 1 (the others rerunning it
    per group: a forward per group, as the driver did before) give the same tensors, bit for bit,
    with float32 or bf16 forwards."""
    from llmslim.quant.prune import prune_blocks

    counts = _held_counts(monkeypatch)
    states = []
    for budget in (1e12, 2 * 2 * PER_BATCH, 1.0):
        model = make_tiny_model("llama")
        if method == "gptq":
            gptq_blocks(model, GPTQConfig(bits=4, group_size=32, forward_dtype=forward_dtype), CALIB, batch_size=2,
                        log=lambda s: None, max_memory=budget)
        else:
            prune_blocks(model, PruneConfig("sparsegpt", sparsity=0.5, true_sequential=True,
                                            forward_dtype=forward_dtype), CALIB, batch_size=2, max_memory=budget)
        states.append(model.state_dict())
    assert counts == [4, 4, 2, 2, 1, 1]  # two blocks per run
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


def test_one_batch_equals_waiting_batches_run_alone(monkeypatch):
    """Batches waiting inside one forward see exactly what each would see run on its own: with one
    batch of all 8 samples the result is that of the driver's single forward, and 4 batches of 2
    differ from it only by the Hessian's summation order (close, not equal)."""
    whole, split = make_tiny_model("llama"), make_tiny_model("llama")
    gptq_blocks(whole, GPTQConfig(bits=4, group_size=32), CALIB, batch_size=8, log=lambda s: None)
    gptq_blocks(split, GPTQConfig(bits=4, group_size=32), CALIB, batch_size=2, log=lambda s: None)
    a, b = whole.state_dict(), split.state_dict()
    scales = [k for k in a if k.endswith(".scales")]
    assert scales and all(torch.allclose(a[k].float(), b[k].float(), rtol=0.05, atol=1e-3) for k in scales)


def test_an_error_in_a_waiting_forward_ends_every_lane(monkeypatch):
    model = make_tiny_model("llama")
    calls = []

    def fail_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("boom in batch 2")

    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(fail_third)
    with pytest.raises(ValueError, match="boom in batch 2"):
        gptq_blocks(model, GPTQConfig(bits=4, group_size=32), CALIB, batch_size=2, log=lambda s: None)
    assert not [t for t in threading.enumerate() if t.name.startswith("llmslim-lane-")]


def _what_dies(arch: str) -> list:
    from llmslim.quant.walk import (
        capture_block_inputs,
        find_blocks,
        find_linears,
        run_block,
        sequential_groups,
    )

    model = make_tiny_model(arch)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, [CALIB[:2]])
    block = blocks[0]
    x = inputs.hidden[0][:1].clone()

    def probe():
        return run_block(block, x, seq._slice_args(inputs.args[0], 1), seq._slice_kwargs(inputs.kwargs[0], 1))

    sets = sequential_groups(block, list(find_linears(block)), probe)
    return seq._dead_while_waiting(block, [block.get_submodule(s[0]) for s in sets], probe, x)


def test_what_a_waiting_forward_no_longer_reads():
    # Llama: q/k/v's normed input is dead at o_proj; the block's input (the residual) after the
    # attention's sum, at gate/up; at down_proj gate/up's normed input too.
    assert _what_dies("llama") == [(0, set()), (1, {0}), (2, {"in", 0, 1}), (3, {"in", 0, 1, 2})]
    # GPT-NeoX's parallel residual adds the block's input last: it is never dropped early.
    assert all("in" not in gone for _, gone in _what_dies("gpt_neox"))


def _autocast() -> tuple:
    on = torch.is_autocast_enabled("cpu")
    return on, torch.get_autocast_dtype("cpu") if on else None


@pytest.mark.parametrize("method", ["gptq", "sparsegpt", "wanda"])
def test_forward_dtype_reaches_every_forward_and_statistics_stay_float32(monkeypatch, method):
    """forward_dtype bf16: every block forward (waiting lanes for GPTQ, the pruners' forwards of the
    unpruned block and of its outputs) computes under bf16 autocast; each statistic is float32, built
    with autocast off from the bf16 inputs the layer computed with; weights stay float32. The result
    differs from fp32 forwards' and is valid (finite; the pruners' exact sparsity)."""
    from llmslim.quant.prune import SparseGPTSolver, WandaSolver, prune_blocks

    solver = {"gptq": seq.GPTQSolver, "sparsegpt": SparseGPTSolver, "wanda": WandaSolver}[method]
    real = solver.accumulate
    stats: list[tuple] = []

    def spy(self, stat, count, X):
        stats.append((X.dtype, stat.dtype, torch.is_autocast_enabled("cpu")))
        return real(self, stat, count, X)

    monkeypatch.setattr(solver, "accumulate", spy)
    states, modes = {}, {}
    for dtype in ("fp32", "bf16"):
        model = make_tiny_model("llama")
        seen = modes[dtype] = set()
        for layer in model.model.layers[1].modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_pre_hook(lambda m, a, seen=seen: seen.add(_autocast()))
        stats.clear()
        if method == "gptq":
            gptq_blocks(model, GPTQConfig(bits=4, group_size=32, forward_dtype=dtype), CALIB, batch_size=2,
                        log=lambda s: None)
        else:
            prune_blocks(model, PruneConfig(method, sparsity=0.5, forward_dtype=dtype), CALIB, batch_size=2)
        states[dtype] = model.state_dict()
        x_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert stats and set(stats) == {(x_dtype, torch.float32, False)}
    assert modes == {"fp32": {(False, None)}, "bf16": {(True, torch.bfloat16)}}
    a, b = states["fp32"], states["bf16"]
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == a[k].dtype and (not v.is_floating_point() or bool(v.isfinite().all()))
               for k, v in b.items())
    if method != "gptq":
        pruned = [v for k, v in b.items() if k.endswith("proj.weight") and ".layers." in k]
        assert pruned and all(v.dtype == torch.float32 and float((v == 0).float().mean()) == 0.5 for v in pruned)


@pytest.mark.parametrize("native", [True, False])
def test_auto_forward_dtype_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, native):
    """forward_dtype auto (the default): the driver's forwards run in bf16 where the CPU reports AMX or
    AVX512-BF16 and in float32 elsewhere (oneDNN's emulated bf16 is slower than float32); the
    result is then that of the explicit setting, byte for byte."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda native=native: native, raising=False)
    assert seq.native_bf16("cpu") is native and seq.native_bf16("cpu:0") is native and seq.native_bf16("meta") is False
    assert seq.resolve_forward_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    assert seq.resolve_forward_dtype("fp32", "cpu") is None and seq.resolve_forward_dtype("bf16", "cpu") == torch.bfloat16
    assert GPTQConfig().forward_dtype == "auto" and PruneConfig("sparsegpt", sparsity=0.5).forward_dtype == "auto"
    states = {}
    for dtype in ("auto", "bf16" if native else "fp32"):
        model = make_tiny_model("llama")
        gptq_blocks(model, GPTQConfig(bits=4, group_size=32, forward_dtype=dtype), CALIB, batch_size=2,
                    log=lambda s: None)
        states[dtype] = model.state_dict()
    a, b = states.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

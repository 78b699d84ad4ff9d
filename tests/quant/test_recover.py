"""Recovery algorithms on tiny random models: the learned grid round-trips, block mode never makes a
block's calibration loss worse, e2e lowers KL, LoRA merges exactly, resume reproduces, time budgets hold."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from llmslim.config import GPTQConfig, RecoverConfig, RTNConfig
from llmslim.errors import UserError
from llmslim.nn import GPTQLinear
from llmslim.pipeline.stages import quantize
from llmslim.quant import distill as distill_mod
from llmslim.quant import reconstruct
from llmslim.quant.distill import distill, kl_divergence
from llmslim.quant.learn import LearnedGrid, LoRALinear
from llmslim.quant.walk import capture_block_inputs, find_blocks, find_linears, linear_weight, run_block
from tests.conftest import make_tiny_model

VOCAB = 320


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster (and immune to a busy machine's thread contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokens(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def gptq_pair(arch: str = "llama", bits: int = 2, sym: bool = True, **kw):
    teacher = make_tiny_model(arch)
    student = copy.deepcopy(teacher)
    config = GPTQConfig(**kw) if "target" in kw else GPTQConfig(bits=bits, group_size=32, sym=sym, **kw)
    quantize(student, config, tokens(8, 32, seed=1))
    return student, teacher


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the learned grid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_learned_grid_starts_exactly_at_the_layer_and_packs_back(sym, desc_act):
    student, teacher = gptq_pair(sym=sym, desc_act=desc_act)
    name, layer = next((n, m) for n, m in student.named_modules() if isinstance(m, GPTQLinear))
    reference = linear_weight(teacher.get_submodule(name)).detach()
    g = LearnedGrid(layer, reference)
    assert (g.b is None) == sym  # a symmetric grid's zero stays where consumers expect it
    assert torch.equal(g.weight().detach(), layer.dequantized_weight())
    back = g.to_gptq()
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(back, key), getattr(layer, key)), key
    # Moved offsets stay in their bounds and still pack: codes in range, zeros in [1, maxq], fp16 scales.
    with torch.no_grad():
        g.V.fill_(3.0)
        g.a.fill_(-2.0)
    g.clamp_()
    assert float(g.V.detach().max()) == 0.5 and float(g.a.detach().min()) == -0.5
    q, s, z = g.grid()
    assert q.min() >= 0 and q.max() <= 3 and z.min() >= 1 and torch.equal(s, s.half().float())
    assert torch.allclose(g.to_gptq().dequantized_weight(), g.weight().detach())


def test_learned_grid_keeps_signed_scales():
    """GGUF Q4_0's scales are signed (d = m / -8): the learned grid starts at them exactly, and a scale
    adjustment changes a scale's magnitude, never its sign (a clamp to positive once zeroed them all)."""
    student, teacher = gptq_pair(target="gguf-q4_0")
    name, layer = next((n, m) for n, m in student.named_modules() if isinstance(m, GPTQLinear))
    assert (layer.scales < 0).any() and (layer.scales > 0).any()
    g = LearnedGrid(layer, linear_weight(teacher.get_submodule(name)).detach())
    assert torch.equal(g.weight().detach(), layer.dequantized_weight())
    assert torch.equal(g.to_gptq().scales, layer.scales)
    with torch.no_grad():
        g.a.fill_(0.25)
    s = g.grid()[1]
    assert torch.equal(torch.sign(s), torch.sign(layer.scales.float()))
    assert torch.allclose(s, (layer.scales.float() * 1.25).half().float())


def test_learned_grid_follow_rounds_the_weight_anew_on_the_learned_scale():
    """``follow`` (AutoRound's min/max tuning): at the start it is the layer exactly; a smaller scale
    re-rounds the original weight on the finer grid (clipping its extremes), where fixed codes would only
    shrink every weight of the group."""
    teacher = make_tiny_model("llama")
    student = copy.deepcopy(teacher)
    quantize(student, RTNConfig(bits=3, group_size=32, full_range=True))
    name, layer = next((n, m) for n, m in student.named_modules() if isinstance(m, GPTQLinear))
    W = linear_weight(teacher.get_submodule(name)).detach().float()
    fixed, follow = LearnedGrid(layer, W), LearnedGrid(layer, W, follow=True)
    assert torch.equal(follow.weight().detach(), layer.dequantized_weight())
    for key in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(follow.to_gptq(), key), getattr(layer, key)), key
    with torch.no_grad():
        fixed.a.fill_(-0.2)
        follow.a.fill_(-0.2)
    q, s, z = follow.grid()
    g = layer.g_idx.long()
    nearest = torch.clamp(torch.round(W / s[g].T + z[g].T), 0, 7)
    assert (q == nearest).float().mean() > 0.99  # the codes of W on the learned grid (up to float ties)
    err_follow = (follow.weight().detach() - W).norm()
    assert err_follow < (fixed.weight().detach() - W).norm()
    torch.testing.assert_close(follow.to_gptq().dequantized_weight(), follow.weight().detach())
    # the scale gets a gradient through the re-rounded codes too
    follow.weight().square().sum().backward()
    assert follow.a.grad is not None and follow.a.grad.abs().sum() > 0


def test_learned_grid_keeps_pruned_weights_zero():
    student, _ = gptq_pair(sym=False)
    layer = next(m for m in student.modules() if isinstance(m, GPTQLinear))
    mask = torch.rand(layer.out_features, layer.in_features, generator=torch.Generator().manual_seed(0)) < 0.5
    g = LearnedGrid(layer, mask=mask)
    with torch.no_grad():
        g.b.fill_(0.9)  # zeros move: pruned weights must follow them
    assert (g.to_gptq().dequantized_weight()[mask] == 0).all()


# --- block mode ---------------------------------------------------------------------------------------


def block_losses(student, teacher, calib, swap: dict[int, torch.nn.Module] | None = None, batch_size: int = 4,
                 amp: bool = False) -> list[float]:
    """Independent measurement: each student block (or a replacement) on the student's own inputs vs
    the teacher's block on the teacher's inputs, block by block, computed as recovery computes them
    (batches of ``batch_size``, bf16 autocast with ``amp``) so that its judgement can be checked exactly."""
    _, s_blocks = find_blocks(student)
    _, t_blocks = find_blocks(teacher)
    batches = list(calib.split(batch_size))
    s_in, t_in = capture_block_inputs(student, s_blocks, batches), capture_block_inputs(teacher, t_blocks, batches)

    def run(block, hidden, inputs) -> list[torch.Tensor]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return [run_block(block, h, a, kw).float()
                    for h, a, kw in zip(hidden, inputs.args, inputs.kwargs, strict=True)]

    X, Y = s_in.hidden, t_in.hidden
    losses = []
    for i in range(len(s_blocks)):
        target = run(t_blocks[i], Y, t_in)
        out = run((swap or {}).get(i, s_blocks[i]), X, s_in)
        losses.append(float(torch.nn.functional.mse_loss(torch.cat(out), torch.cat(target))))
        X, Y = run(s_blocks[i], X, s_in), target
    return losses


@pytest.mark.parametrize("arch,lr,target,amp", [("llama", None, "", False), ("llama", None, "", True),
                                                ("gpt2", None, "", False), ("llama", 50.0, "", False),
                                                ("llama", 50.0, "", True), ("llama", None, "gguf-q4_0", False)])
def test_block_mode_never_increases_a_blocks_calibration_loss(arch, lr, target, amp):
    """Against the input (GPTQ) block on the same inputs, measured independently, in the precision the
    recovery computes in (float32, or bf16 autocast); an absurd learning rate must fall back to the
    input block rather than make it worse. The GGUF Q4_0 grid (signed scales) must be improved too,
    not only survive by falling back."""
    student, teacher = gptq_pair(arch, target=target) if target else gptq_pair(arch)
    gptq_blocks = copy.deepcopy(find_blocks(student)[1])
    calib = tokens(8, 32)
    logs = reconstruct.recover_blocks(student, teacher, calib, RecoverConfig(iters=6, batch_size=4, lr=lr, amp=amp),
                                      progress=False)
    assert [x.block for x in logs] == [0, 1] and all(x.trained == "grid" for x in logs)
    after = block_losses(student, teacher, calib, amp=amp)
    before = block_losses(student, teacher, calib, swap=dict(enumerate(gptq_blocks)), amp=amp)
    for a, b, x in zip(after, before, logs, strict=True):
        assert a <= b * (1 + 1e-6), (a, b, x)
    if lr is None:
        assert any(x.kept == "recovered" and x.loss_after < x.loss_before for x in logs)
    # Still a GPTQ model with the input's layers; codes moved by at most one step.
    s_layers = {n: m for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
    g_layers = {n: m for n, m in gptq_blocks.named_modules() if isinstance(m, GPTQLinear)}
    assert len(s_layers) == len(g_layers) == {"llama": 14, "gpt2": 8}[arch]
    for (n, m), (_, g) in zip(sorted(s_layers.items()), sorted(g_layers.items()), strict=True):
        assert (m.codes()[0] - g.codes()[0]).abs().max() <= 1, n


@pytest.mark.parametrize("follow", [False, True])
def test_block_mode_from_round_to_nearest_on_the_full_range_grid(follow):
    """AutoRound's own start (round-to-nearest on the signed full-range grid), with fixed codes or codes
    that follow the learned scale: no block gets worse, some get better, every scale keeps its sign."""
    teacher = make_tiny_model("llama")
    student = copy.deepcopy(teacher)
    quantize(student, RTNConfig(bits=2, group_size=32, full_range=True))
    rtn_blocks = copy.deepcopy(find_blocks(student)[1])
    calib = tokens(8, 32)
    logs = reconstruct.recover_blocks(student, teacher, calib, RecoverConfig(iters=6, batch_size=4, follow=follow),
                                      progress=False)
    after = block_losses(student, teacher, calib)
    before = block_losses(student, teacher, calib, swap=dict(enumerate(rtn_blocks)))
    for a, b, x in zip(after, before, logs, strict=True):
        assert a <= b * (1 + 1e-6), (a, b, x)
    assert any(x.kept == "recovered" and x.loss_after < x.loss_before for x in logs)
    s_layers = {n: m for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
    r_layers = {n: m for n, m in rtn_blocks.named_modules() if isinstance(m, GPTQLinear)}
    for (n, m), (_, r) in zip(sorted(s_layers.items()), sorted(r_layers.items()), strict=True):
        assert torch.equal(torch.sign(m.scales), torch.sign(r.scales)), n


@pytest.mark.parametrize("spoil", ["last", "best batch"])
def test_block_mode_keeps_the_better_of_best_batch_and_last_step_on_the_whole_set(monkeypatch, spoil):
    """The training loop hands back the parameters of its best mini-batch; the last step's may be better
    on the whole calibration set, or worse. Spoil one of the two (the last step blown up, or a 'best'
    snapshot that is the untrained start) and the other must be the one kept."""
    student, teacher = gptq_pair()
    real = reconstruct._iterate

    def iterate(block, X, target, initial, s_in, bs, gen, planned, deadline, config, step, snapshot_of, *rest):
        start = reconstruct._snapshot(snapshot_of)
        k, best, best_state = real(block, X, target, initial, s_in, bs, gen, planned, deadline, config, step,
                                   snapshot_of, *rest)
        if spoil == "best batch":
            return k, best, start
        with torch.no_grad():
            for m in snapshot_of:
                m.a.fill_(-0.5)  # every scale halved: far worse than any trained state
        return k, best, best_state

    monkeypatch.setattr(reconstruct, "_iterate", iterate)
    logs = reconstruct.recover_blocks(student, teacher, tokens(8, 32), RecoverConfig(iters=6, batch_size=4),
                                      progress=False)
    assert all(x.chosen == ("best batch" if spoil == "last" else "last") for x in logs), logs
    assert any(x.kept == "recovered" and x.loss_after < x.loss_before for x in logs)


def test_block_mode_sees_every_calibration_sample_equally_often(monkeypatch):
    """Mini-batches walk shuffled epochs of the samples: 6 steps of 4 out of 8 samples is 3 epochs, so
    every sample of every block is trained on exactly 3 times (independent draws would not do that)."""
    student, teacher = gptq_pair()
    seen: list[torch.Tensor] = []
    real = reconstruct.run_block

    def run(block, hidden, *rest):
        if torch.is_grad_enabled():  # a training step, not a whole-set forward
            seen.append(hidden[:, 0, 0].detach().clone())
        return real(block, hidden, *rest)

    monkeypatch.setattr(reconstruct, "run_block", run)
    reconstruct.recover_blocks(student, teacher, tokens(8, 32), RecoverConfig(iters=6, batch_size=4, amp=False),
                               progress=False)
    assert len(seen) == 12  # 2 blocks x 6 steps
    for block in (seen[:6], seen[6:]):
        _, counts = torch.cat(block).unique(return_counts=True)
        assert len(counts) == 8 and (counts == 3).all(), counts


def test_block_mode_sparse_float_student_keeps_its_mask():
    teacher = make_tiny_model("llama")
    student = copy.deepcopy(teacher)
    masks = {}
    with torch.no_grad():
        for n, m in find_linears(find_blocks(student)[1]).items():
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0
            masks[n] = m.weight == 0
    calib = tokens(8, 32)
    before = block_losses(student, teacher, calib)
    logs = reconstruct.recover_blocks(student, teacher, calib, RecoverConfig(iters=6, batch_size=4, lr=1e-3, amp=False),
                                      progress=False)
    assert all(x.trained == "weights" for x in logs)
    for n, m in find_linears(find_blocks(student)[1]).items():
        assert torch.equal(m.weight == 0, masks[n]), n
    assert block_losses(student, teacher, calib)[0] <= before[0] * (1 + 1e-6)
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_block_mode_pruned_quantized_student_keeps_its_zeros():
    student, teacher = gptq_pair(sparsity=0.5)
    zeros = {n: m.dequantized_weight() == 0 for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
    reconstruct.recover_blocks(student, teacher, tokens(8, 32), RecoverConfig(iters=6, batch_size=4), pruned=True,
                               progress=False)
    for n, m in student.named_modules():
        if isinstance(m, GPTQLinear):
            assert ((m.dequantized_weight() == 0) >= zeros[n]).all(), n


def test_block_mode_resume_equals_uninterrupted(tmp_path, monkeypatch):
    config = RecoverConfig(iters=5, batch_size=4)
    calib = tokens(8, 32)
    full, teacher = gptq_pair()
    reconstruct.recover_blocks(full, teacher, calib, config, tmp_path / "a", progress=False)

    save = reconstruct._State.save

    def save_then_die(self, i, block, log):
        save(self, i, block, log)
        raise KeyboardInterrupt  # killed right after block 0 was checkpointed

    monkeypatch.setattr(reconstruct._State, "save", save_then_die)
    student, _ = gptq_pair()
    with pytest.raises(KeyboardInterrupt):
        reconstruct.recover_blocks(student, teacher, calib, config, tmp_path / "b", progress=False)
    monkeypatch.setattr(reconstruct._State, "save", save)
    student, _ = gptq_pair()
    logs = reconstruct.recover_blocks(student, teacher, calib, config, tmp_path / "b", resume=True, progress=False)
    assert len(logs) == 2
    a, b = state(full), state(student)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Other settings do not resume from that state.
    with pytest.raises(UserError, match="other settings"):
        reconstruct.recover_blocks(student, teacher, calib, RecoverConfig(iters=6, batch_size=4), tmp_path / "b",
                                   resume=True, progress=False)


def test_block_mode_max_time(monkeypatch):
    student, teacher = gptq_pair()
    t0 = time.perf_counter()
    logs = reconstruct.recover_blocks(student, teacher, tokens(8, 32), RecoverConfig(iters=100000, max_time=3),
                                      progress=False)
    assert time.perf_counter() - t0 < 3 + 2.5
    assert all(x.iters < 100000 for x in logs)
    # Out of time before the last block: it keeps its input weights, and the stage still reports.
    from llmslim.pipeline.stages import Context, run_recover

    block = reconstruct._recover_block

    def slow(*args, **kwargs):  # block 0 overruns the whole budget, whatever this CPU's speed
        out = block(*args, **kwargs)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(reconstruct, "_recover_block", slow)
    student, teacher = gptq_pair()
    _, report = run_recover(student, RecoverConfig(iters=100000, max_time=0.2),
                            Context(tokens(8, 32), teacher=lambda: teacher))
    last = report.layers[-1]
    assert last["kept"] == "input" and last["loss_before"] is None and last["iters"] == 0
    assert report.extra["recover"]["blocks"] == 2


def test_block_mode_max_time_below_the_forwards_trains_nothing_and_says_so(monkeypatch):
    """A budget the calibration forwards alone use up: no block runs a (useless) single step, every
    block keeps its input weights, and one line says why and what the forwards need."""
    student, teacher = gptq_pair()
    before = state(student)
    forward = reconstruct._Inputs.forward

    def slow(self, block, hidden):
        time.sleep(0.4)  # the forwards of a big model: far above this tiny block's training steps
        return forward(self, block, hidden)

    monkeypatch.setattr(reconstruct._Inputs, "forward", slow)
    said = []
    logs = reconstruct.recover_blocks(student, teacher, tokens(8, 32), RecoverConfig(iters=100000, max_time=1.2),
                                      log=said.append, progress=False)
    assert [x.iters for x in logs] == [0, 0] and all(x.kept == "input" for x in logs)
    after = state(student)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len([m for m in said if "forwards alone" in m]) == 1


def test_block_mode_refuses_what_it_cannot_recover():
    student, teacher = gptq_pair()
    with pytest.raises(UserError, match="not a compressed version"):
        reconstruct.recover_blocks(student, make_tiny_model("llama", seed=7), tokens(4, 16), RecoverConfig(),
                                   progress=False)
    with pytest.raises(UserError, match="teacher is quantized"):
        reconstruct.recover_blocks(student, student, tokens(4, 16), RecoverConfig(), progress=False)
    with pytest.raises(UserError, match="neither"):
        reconstruct.recover_blocks(copy.deepcopy(teacher), teacher, tokens(4, 16), RecoverConfig(), progress=False)
    shallow = copy.deepcopy(student)
    del find_blocks(shallow)[1][1]
    with pytest.raises(UserError, match="e2e"):
        reconstruct.recover_blocks(shallow, teacher, tokens(4, 16), RecoverConfig(), progress=False)


# --- end to end ---------------------------------------------------------------------------------------


def e2e(**kw) -> RecoverConfig:
    return RecoverConfig(**{"mode": "e2e", "batch_size": 4, "checkpoint_every": 2, **kw})


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 7)
    assert float(kl_divergence(a, a, 2.0)) == pytest.approx(0, abs=1e-6)
    assert float(kl_divergence(a, torch.randn(2, 5, 7))) > 0


def test_e2e_quantized_student_lowers_kl_and_keeps_its_codes():
    student, teacher = gptq_pair()
    codes = {n: m.qweight.clone() for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
    scales = {n: m.scales.clone() for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
    r = distill(student, teacher, tokens(24, 32), tokens(4, 32, seed=9), e2e(lr=1e-2), progress=False)
    assert r.trained == "scales" and r.val_after < r.val_before and r.steps == 6
    layers = {n: m for n, m in student.named_modules() if isinstance(m, GPTQLinear)}
    assert layers.keys() == codes.keys()
    assert all(torch.equal(layers[n].qweight, codes[n]) for n in codes)  # integer codes untouched
    assert any(not torch.equal(layers[n].scales, scales[n]) for n in codes)


def test_e2e_float_student_lowers_kl_all_weights_and_lora():
    teacher = make_tiny_model("llama")
    for rank in (0, 4):
        student = make_tiny_model("llama", seed=1)
        r = distill(student, teacher, tokens(16, 32), tokens(4, 32, seed=9), e2e(lr=1e-3, lora_rank=rank),
                    progress=False)
        assert r.trained == ("lora" if rank else "weights") and r.val_after < r.val_before
        assert not any("lora" in n or n.endswith(".A") for n, _ in student.named_parameters())  # merged back


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("masked", [False, True])
def test_lora_merge_equals_unmerged(arch, masked):
    model = make_tiny_model(arch)
    name, base = next(iter(find_linears(find_blocks(model)[1]).items()))
    W = linear_weight(base)
    mask = (torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.5) if masked else None
    lora = LoRALinear(copy.deepcopy(base), 4, torch.Generator().manual_seed(0), mask=mask)
    with torch.no_grad():
        lora.B.normal_(0, 0.1)  # a trained adapter (B starts at zero)
    x = torch.randn(3, 5, W.shape[1])
    with torch.no_grad():
        unmerged = lora(x)
        merged = lora.merge()(x)
    assert torch.allclose(unmerged, merged, atol=1e-5)
    if masked:
        assert (linear_weight(lora.base)[mask] == linear_weight(base)[mask]).all()


def test_e2e_keeps_a_sparse_students_zeros():
    teacher = make_tiny_model("llama")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for m in find_linears(find_blocks(student)[1]).values():
            m.weight[m.weight.abs() < m.weight.abs().median()] = 0
    zeros = {n: m.weight == 0 for n, m in find_linears(find_blocks(student)[1]).items()}
    for rank in (0, 4):
        distill(student, teacher, tokens(8, 32), tokens(4, 32, seed=9), e2e(lr=1e-2, lora_rank=rank), pruned=True,
                progress=False)
        for n, m in find_linears(find_blocks(student)[1]).items():
            assert torch.equal(m.weight == 0, zeros[n]), (rank, n)


@pytest.mark.parametrize("quantized", [True, False])
def test_e2e_resume_equals_uninterrupted(tmp_path, quantized):
    def pair():
        if quantized:
            return gptq_pair()
        return make_tiny_model("llama", seed=1), make_tiny_model("llama")

    config = e2e(lr=1e-2 if quantized else 1e-3, checkpoint_every=2)
    train, val = tokens(24, 32), tokens(4, 32, seed=9)
    full, teacher = pair()
    r_full = distill(full, teacher, train, val, config, tmp_path / "a", progress=False)

    def die(step, tokens_seen, model):
        if step == 4:
            raise KeyboardInterrupt  # killed after the checkpoint of step 4

    student, teacher = pair()
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, train, val, config, tmp_path / "b", progress=False, on_checkpoint=die)
    student, teacher = pair()
    r = distill(student, teacher, train, val, config, tmp_path / "b", resume=True, progress=False)
    a, b = state(full), state(student)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r.history == r_full.history and r.val_after == r_full.val_after and r.steps == r_full.steps == 6


def test_e2e_max_time_stops_on_time_with_the_best_student():
    student, teacher = gptq_pair()
    t0 = time.perf_counter()
    r = distill(student, teacher, tokens(4000, 32), tokens(4, 32, seed=9), e2e(max_time=3.0, checkpoint_every=1000),
                progress=False)
    elapsed = time.perf_counter() - t0
    assert r.stopped == "max-time" and 0 < r.steps < r.planned_steps
    assert elapsed < 3.0 + 2.5, elapsed
    assert r.val_after <= r.val_before and r.history[-1]["step"] == r.steps  # the last student was scored too


def test_e2e_gradient_checkpointing_gives_the_same_gradients():
    teacher = make_tiny_model("llama")
    results = []
    for on in (False, True):
        student = make_tiny_model("llama", seed=1)
        distill(student, teacher, tokens(4, 32), tokens(2, 32, seed=9), e2e(lr=1e-3, amp=False),
                checkpointing=on, progress=False)
        results.append(state(student))
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


@pytest.mark.parametrize("native", [True, False])
def test_amp_by_default_only_where_the_cpu_has_native_bf16(monkeypatch, native):
    """amp None (the default): bf16 autocast where the CPU reports AMX or AVX512-BF16, float32 elsewhere
    (emulated bf16 is several times slower there); the result is then that of the explicit setting,
    byte for byte, in both modes."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda native=native: native, raising=False)
    assert RecoverConfig().amp is None
    teacher = make_tiny_model("llama")
    results = {}
    for amp in (None, native):
        student = make_tiny_model("llama", seed=1)
        distill(student, teacher, tokens(4, 32), tokens(2, 32, seed=9), e2e(lr=1e-3, amp=amp), progress=False)
        results[amp] = state(student)
    assert results[None].keys() == results[native].keys()
    assert all(torch.equal(results[None][k], results[native][k]) for k in results[None])
    blocks = {}
    for amp in (None, native, not native):
        student, teacher = gptq_pair()
        reconstruct.recover_blocks(student, teacher, tokens(8, 16), RecoverConfig(iters=3, batch_size=4, amp=amp),
                                   progress=False)
        blocks[amp] = state(student)
    assert all(torch.equal(blocks[None][k], blocks[native][k]) for k in blocks[None])
    assert any(not torch.equal(blocks[None][k], blocks[not native][k]) for k in blocks[None])


def test_e2e_refuses_bad_inputs():
    student, teacher = gptq_pair()
    with pytest.raises(UserError, match="vocabularies"):
        distill(student, make_tiny_model("llama", vocab_size=400), tokens(4, 16), tokens(1, 16), e2e(),
                progress=False)
    with pytest.raises(UserError, match="lora-rank"):
        distill(student, teacher, tokens(4, 16), tokens(1, 16), e2e(lora_rank=4), progress=False)
    with pytest.raises(UserError, match="no training text"):
        distill(student, teacher, tokens(0, 16), tokens(1, 16), e2e(), progress=False)
    assert distill_mod.LR["scales"] > 0


@pytest.mark.parametrize("kw,msg", [
    (dict(lr=0), "--lr must be positive"), (dict(lr=-1.0), "--lr must be positive"), (dict(mode="x"), "--mode"),
    (dict(iters=0), "--iters"), (dict(max_time=-1), "--max-time"), (dict(mode="e2e", tokens=0), "--tokens"),
    (dict(mode="e2e", temperature=0), "--temperature"), (dict(tokens=10), "does not use --tokens"),
    (dict(mode="e2e", iters=5), "does not use --iters"), (dict(lr="fast"), "--lr must be positive"),
    (dict(mode="e2e", follow=True), "does not use --follow"),
])
def test_config_refuses_bad_values(kw, msg):
    with pytest.raises(UserError, match=msg):
        RecoverConfig(**kw)

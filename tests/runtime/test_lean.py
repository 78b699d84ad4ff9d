"""The lean forward on every family it covers: transformers' logits (fp32 to rounding, bf16 within
bf16's own noise), chunked prefill = unchunked, and batch invariance -- a row decoded in a batch
gives bit for bit the logits it gives alone, through the server's padded batch and its engine."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from llmslim.runtime.families import describe, lean_support
from llmslim.runtime.fast import accelerate
from llmslim.runtime.generate import Stepper
from llmslim.runtime.invariant import RowInvariant, cancelling_rows
from llmslim.runtime.kernels import int4_available
from llmslim.runtime.sampling import SamplingParams
from llmslim.server.engine import Done, Engine, Output
from llmslim.server.kvbatch import PaddedBatch, prefill
from tests.conftest import make_tiny_model, make_tiny_tokenizer

WINDOW = 6  # short, so that 20-token sequences cross it
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3")
WINDOWED = ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


def tiny(family: str, window: int | None = WINDOW, seed: int = 0):
    """A 3-layer random model of ``family`` (transformers' own config class) with every switch on:
    sliding windows, soft-capping, q/k norms, a partial rotary embedding, random norm weights."""
    import transformers as T

    torch.manual_seed(seed)
    c = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
    gemma = dict(head_dim=16, query_pre_attn_scalar=24)
    slide = dict(sliding_window=window) if window else {}
    if family == "llama":
        cfg = T.LlamaConfig(**c)
    elif family == "mistral":
        cfg = T.MistralConfig(**slide, **c) if window else T.MistralConfig(sliding_window=None, **c)
    elif family == "qwen2":  # q/k/v biases; layer 0 full, the others sliding
        cfg = T.Qwen2Config(use_sliding_window=bool(window), max_window_layers=1, **slide, **c)
    elif family == "qwen3":  # q/k norms
        cfg = T.Qwen3Config(head_dim=16, use_sliding_window=bool(window), max_window_layers=1, **slide, **c)
    elif family == "phi3":  # fused qkv/gate_up, half the head dims rotated
        cfg = T.Phi3Config(partial_rotary_factor=0.5, pad_token_id=0, **slide, **c)
    elif family == "gemma":
        cfg = T.GemmaConfig(head_dim=16, **c)
    elif family == "gemma2":  # soft-capping, sandwich norms, alternating sliding layers
        cfg = T.Gemma2Config(**gemma, **(slide or dict(sliding_window=4096)), **c)
    elif family == "gemma3":  # q/k norms, two rotary tables
        cfg = T.Gemma3TextConfig(**gemma, **(slide or dict(sliding_window=4096)),
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"], **c)
    else:
        raise ValueError(family)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # Gemma starts its norms at 0 (a weight of 1 + 0): make every weight count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def quantized(family: str):
    from llmslim.config import RTNConfig
    from llmslim.pipeline.stages import quantize

    model = tiny(family)
    quantize(model, RTNConfig(bits=4, group_size=32, sym=False))
    return model


IDS = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(1)).tolist()


def lean_logits(model, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits after each position from the first chunk's end on: the prompt in ``chunks``, then one
    token at a time, through the batch-1 loop's ``Stepper`` (which must take the lean path)."""
    step = Stepper(model, 64)
    assert step.lean is not None
    out, at = [], 0
    for n in chunks:
        out.append(step(ids[at:at + n]))
        at += n
    out += [step([t]) for t in ids[at:]]
    return torch.stack(out).float()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_covered(family):
    model = tiny(family)
    assert lean_support(model) is None
    assert describe(model).startswith("lean forward")


def test_uncovered_family_says_so_and_runs_plain():
    model = accelerate(make_tiny_model("gpt_neox"), torch.float32)
    assert "gpt_neox" in lean_support(model)
    assert describe(model).startswith("transformers' own forward")
    assert Stepper(model, 32).lean is None


@pytest.mark.parametrize("family", WINDOWED)
def test_windows_matter_here(family):
    # the tests below would not notice a forward that ignored the window: these inputs do
    ids = IDS
    assert not torch.allclose(hf_logits(tiny(family), ids), hf_logits(tiny(family, window=None), ids), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_equal_transformers(family):
    model = tiny(family)
    want = hf_logits(model, IDS)[7:]
    got = lean_logits(accelerate(copy.deepcopy(model), torch.float32), IDS, [8])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item() + 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_within_bf16_noise(family):
    # the lean bf16 forward is as close to fp32 as transformers' own forward computed in bf16
    model = tiny(family)
    ref = hf_logits(model, IDS)[7:]
    hf_bf16 = hf_logits(copy.deepcopy(model).to(torch.bfloat16), IDS)[7:]
    got = lean_logits(accelerate(copy.deepcopy(model), torch.bfloat16), IDS, [8])
    floor = (hf_bf16 - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= 2 * floor + 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_unchunked(family):
    model = accelerate(tiny(family), torch.float32)
    whole = lean_logits(model, IDS, [14])
    chunked = lean_logits(model, IDS, [5, 2, 7])[2:]  # chunks shorter and longer than the window
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5 * whole.abs().max().item())
    model16 = accelerate(tiny(family), torch.bfloat16)
    a, b = lean_logits(model16, IDS, [14]).float(), lean_logits(model16, IDS, [5, 2, 7])[2:].float()
    # bf16: another chunking sums in another order (bitwise equality is not promised, and depends
    # on the CPU's GEMM kernels); a chunk that misread the cache would be off by the logits' scale.
    diff = (a - b).abs().max()
    assert diff <= 0.03 * a.abs().max()
    top2 = a.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * diff  # where rounding cannot flip the top token
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


# --- batch invariance --------------------------------------------------------------------------

PROMPTS = [IDS[:3], IDS[2:10], [11] * 5, IDS[:20], IDS[5:17]]


def alone(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The logits a prompt's row gets when it is the only row of the server's batch."""
    batch = PaddedBatch(model)
    cache, _ = prefill(model, prompt, all_logits=False)
    batch.add(cache, len(prompt))
    return [batch.step([t]).clone()[0] for t in tokens]


def tokens_for(i: int, n: int) -> list[int]:
    return [(37 * i + 11 * k) % 320 for k in range(n)]


def check_batch_invariance(model):
    steps = 12
    want = [alone(model, p, tokens_for(i, steps)) for i, p in enumerate(PROMPTS)]
    batch = PaddedBatch(model)
    live: list[list[int]] = []  # [prompt index, steps taken]

    def join(i):
        cache, _ = prefill(model, PROMPTS[i], all_logits=False)
        batch.add(cache, len(PROMPTS[i]))
        live.append([i, 0])

    def step():
        logits = batch.step([tokens_for(i, steps)[k] for i, k in live])
        for row, (i, k) in enumerate(live):
            assert torch.equal(logits[row], want[i][k]), f"prompt {i} step {k}: differs from its row alone"
            live[row][1] += 1

    join(0)
    join(1)
    step()
    step()
    join(3)  # the longest: the others get more left padding
    step()
    join(2)
    join(4)
    for _ in range(4):
        step()
    order = batch.remove([1])
    live[:] = [live[i] for i in order]
    for _ in range(3):
        step()
    assert getattr(model, "_llmslim_lean", None) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_equal_alone_bit_for_bit(family):
    check_batch_invariance(accelerate(tiny(family), torch.bfloat16))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batched_rows_equal_alone_bit_for_bit_fp32(family):
    # fp32 matmuls sum in another order from 2 rows on (a GEMM, not a GEMV): RowInvariant cuts them
    check_batch_invariance(accelerate(tiny(family), torch.float32))


@pytest.mark.skipif(not int4_available(), reason="torch lacks the CPU int4 kernel")
@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2"])
def test_batched_rows_equal_alone_bit_for_bit_int4(family):
    model = accelerate(quantized(family), torch.bfloat16)
    assert any(type(m).__name__ == "Int4Linear" for m in model.modules())
    check_batch_invariance(model)


def run_engine(model, tok, cases: list[tuple[list[int], int]], together: bool) -> list[list[int]]:
    """Greedy tokens of each (prompt, max_tokens) case from the engine: all submitted at once, or
    each submitted after the one before finished."""
    engine = Engine(model, tok, max_batch=4, max_queue=64)
    engine.start()
    try:
        outs = [[] for _ in cases]
        dones = [threading.Event() for _ in cases]

        def sink(i):
            def on(event):
                if isinstance(event, Output):
                    outs[i].extend(event.token_ids)
                elif isinstance(event, Done):
                    dones[i].set()
            return on

        for i, (prompt, n) in enumerate(cases):
            engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink(i))
            if not together:
                assert dones[i].wait(60)
        assert all(d.wait(120) for d in dones)
        return outs
    finally:
        engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_concurrent_equals_sequential(family):
    model = accelerate(tiny(family), torch.bfloat16)
    tok = make_tiny_tokenizer()
    # 10 requests, 4 rows at a time: rows join and leave at different steps, batches of 1 to 4
    cases = [(PROMPTS[i % len(PROMPTS)][: 3 + i % 7], 5 + (i * 7) % 13) for i in range(10)]
    sequential = run_engine(model, tok, cases, together=False)
    assert run_engine(model, tok, cases, together=True) == sequential


# --- RowInvariant on its own -----------------------------------------------------------------


def test_row_invariant_cuts_where_the_kernel_varies():
    calls = []

    def varies_above_4(x):  # a "kernel" whose rows change once more than 4 share a call
        calls.append(x.shape[0])
        return x * (2.0 if x.shape[0] > 4 else 1.0)

    rows = RowInvariant()
    x = torch.randn(11, 3)
    assert torch.equal(rows(varies_above_4, "k", x), x)
    assert rows.plan(varies_above_4, "k", 11, 3, x.dtype) == [4, 4, 3]
    calls.clear()
    rows(varies_above_4, "k", x)
    assert sorted(calls) == [3, 4, 4]  # probed once: later calls only run the plan
    same = RowInvariant()
    assert same.plan(lambda x: x + 1, "k", 11, 3, x.dtype) == [11]


def sequential(x: torch.Tensor, W: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``x @ W.T`` summed in float32 one product at a time, forwards or backwards, rounded to x's dtype."""
    p = x.float()[:, None, :] * W.float()[None]  # [M, N, K]
    acc = torch.zeros(p.shape[:2])
    for k in (reversed(range(p.shape[-1])) if reverse else range(p.shape[-1])):
        acc = acc + p[..., k]  # float32, rounded at every step (cumsum would accumulate in double)
    return acc.to(x.dtype)


def test_cancelling_probe_sees_a_bf16_kernel_that_only_changes_the_summation_order():
    """A "kernel" that sums in another order when it gets more than one row: its bf16 outputs differ
    from the one-row calls' only near rounding boundaries, which the cancelling rows create."""
    W = (torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) / 8).bfloat16()

    def reordered(x):
        return sequential(x, W, reverse=x.shape[0] > 1)

    rows = RowInvariant()
    assert not rows.agrees(reordered, "k", 5, 64, torch.bfloat16, cancelling_rows([W]))
    assert rows.plan(reordered, "k", 5, 64, torch.bfloat16, cancelling_rows([W])) == [1] * 5
    # The same kernel summing in one order at every M agrees; so does a split weight (fused q/k/v).
    same = RowInvariant()
    assert same.agrees(lambda x: sequential(x, W, False), "k", 5, 64, torch.bfloat16,
                       cancelling_rows([W[:40], W[40:]]))
    # Each probe row cancels exactly: its largest products are ~2^20 times its result.
    x = cancelling_rows([W])(torch.Generator().manual_seed(0), 4)
    exact = x.double() @ W.double().T
    assert (exact.abs().min(-1).values < 2.0 ** -6).all() and (x.abs().max(-1).values > 2.0 ** 4).all()


@pytest.mark.parametrize("family", ["gemma2", "gpt_neox"])
def test_llmslim_info_names_the_path(family, tmp_path, capsys):
    import json

    from llmslim.cli import main

    model = tiny(family) if family in FAMILIES else make_tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    path = json.loads(capsys.readouterr().out)["fast_path"]
    if family in FAMILIES:
        assert path.startswith("lean forward (gemma2)")
    else:
        assert path.startswith("transformers' own forward") and "gpt_neox" in path

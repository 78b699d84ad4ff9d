"""Chunked prefill (issue 16): a long prompt is prefilled ``prefill_chunk`` positions per engine step
between decode steps, so running streams keep getting tokens; chunked = unchunked; a request
cancelled or failing mid-prefill frees its slot and its cache, and no one else notices.

Every ordering claim here is checked by the order of the engine's events, never by timing: a
request's sink runs on the engine thread, so a sink that submits or aborts another request does
so at an exact point of the engine's loop."""

from __future__ import annotations

import argparse
import gc
import queue
import threading
import weakref

import pytest
import torch

from llmslim.runtime.fast import accelerate
from llmslim.runtime.sampling import SamplingParams
from llmslim.server.engine import PREFILL_CHUNK, Done, Engine, Failed, Output, PromptLogprobs
from llmslim.server.kvbatch import Prefill, prefill
from tests.conftest import make_tiny_model, make_tiny_tokenizer

LONG = torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(3)).tolist()
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama"), make_tiny_tokenizer()


def started(model, tok, **kw) -> Engine:
    engine = Engine(model, tok, **kw)
    engine.start()
    return engine


def collect(q: queue.Queue) -> dict:
    out = {"tokens": {}, "logprobs": {}, "prompt_logprobs": None}
    while True:
        event = q.get(timeout=60)
        if isinstance(event, Failed):
            raise AssertionError(event.message)
        if isinstance(event, Done):
            return out
        if isinstance(event, PromptLogprobs):
            out["prompt_logprobs"] = event.entries
        elif isinstance(event, Output):
            out["tokens"].setdefault(event.index, []).extend(event.token_ids)
            out["logprobs"].setdefault(event.index, []).extend(lp for lp, _ in event.logprobs or [])


def run_all(engine: Engine, cases: list[tuple[list[int], dict]]) -> list[dict]:
    """All submitted at once, collected in order."""
    queues = []
    for prompt, kw in cases:
        q: queue.Queue = queue.Queue()
        engine.submit(prompt, SamplingParams(**kw), q.put)
        queues.append(q)
    return [collect(q) for q in queues]


# --- chunked = unchunked ------------------------------------------------------------------------


CASES = [(LONG, dict(max_tokens=8, logprobs=2, **GREEDY)),
         (LONG[:16], dict(max_tokens=6, logprobs=2, **GREEDY)),  # exactly one chunk
         (LONG[:17], dict(max_tokens=6, logprobs=2, n=2, **GREEDY)),  # one position into the second
         ([7], dict(max_tokens=5, logprobs=2, **GREEDY)),
         (LONG[:50], dict(max_tokens=7, **GREEDY))]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "llama-bf16-fast"])
def test_chunked_prefill_equals_unchunked(arch):
    model, tok = make_tiny_model(arch.split("-")[0]), make_tiny_tokenizer()
    if arch.endswith("-fast"):
        model = accelerate(model, torch.bfloat16)
    whole = started(model, tok, max_batch=8, prefill_chunk=1000)
    try:
        want = run_all(whole, CASES)
        assert whole.stats.prefill_chunks == len(CASES)
    finally:
        whole.stop()
    chunked = started(model, tok, max_batch=8, prefill_chunk=16)
    try:
        got = run_all(chunked, CASES)
        # 100 -> 7 chunks, 16 -> 1, 17 -> 2, 1 -> 1, 50 -> 4
        assert chunked.stats.prefill_chunks == 15
        assert chunked.stats.prompt_tokens == sum(len(p) for p, _ in CASES)
    finally:
        chunked.stop()
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]  # greedy: token for token
    tol = 0.05 if arch.endswith("-fast") else 1e-4  # bf16: the attention kernel's blocking moves with the chunk
    for g, w in zip(got, want, strict=True):
        for i in w["logprobs"]:
            torch.testing.assert_close(torch.tensor(g["logprobs"][i]), torch.tensor(w["logprobs"][i]),
                                       rtol=0, atol=tol)


def test_chunks_continue_the_cache(tiny):
    """``Prefill`` a chunk at a time ends with the cache and last logits of one whole-prompt forward."""
    model, _ = tiny
    cache, logits = prefill(model, LONG, all_logits=False)
    run = Prefill(model, LONG, 16)
    sizes = []
    while not run.finished:
        sizes.append(run.step())
    assert sizes == [16] * 6 + [4] and run.done == len(LONG)
    torch.testing.assert_close(run.last, logits[-1], rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(run.cache.layers, cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)


def test_a_request_s_tokens_do_not_depend_on_the_chunks_around_it():
    """Batch invariance (bf16 fast path): the chunk grid is the prompt's own, so a request's
    log-probs are bit for bit the same alone or while other prompts prefill and rows decode."""
    model = accelerate(make_tiny_model("llama"), torch.bfloat16)
    tok = make_tiny_tokenizer()
    probe = (LONG[:70], dict(max_tokens=10, logprobs=1, **GREEDY))
    engine = started(model, tok, max_batch=8, prefill_chunk=16)
    try:
        (alone,) = run_all(engine, [probe])
        others = [(LONG[30:35], dict(max_tokens=30, **GREEDY)), (LONG[5:28], dict(max_tokens=3, **GREEDY)),
                  (LONG[::-1][:41], dict(max_tokens=12, **GREEDY))]
        together = run_all(engine, [*others, probe, (LONG[:9], dict(max_tokens=20, **GREEDY))])
    finally:
        engine.stop()
    assert together[3]["tokens"] == alone["tokens"]
    assert together[3]["logprobs"] == alone["logprobs"]  # exact floats, not a tolerance


# --- running streams are not stalled ---------------------------------------------------------------


def a_then_b(engine: Engine, b_prompt: list[int], at_token: int = 1, then=None) -> tuple[list[str], dict]:
    """Run request A (short prompt, 40 tokens); A's sink submits B (``b_prompt``) as A's token
    ``at_token`` is sent, and calls ``then(ids)`` at each later token of A. Returns the order of
    the events ("A" per token of A, "B" per token of B) from B's submission on, and the ids."""
    order: list[str] = []
    ids: dict = {}
    done = {"A": threading.Event(), "B": threading.Event()}
    b_events: list = []

    def b_sink(event):
        b_events.append(event)
        if isinstance(event, Output):
            order.extend("B" * len(event.token_ids))
        elif isinstance(event, Done | Failed):
            done["B"].set()

    seen = {"n": 0}

    def a_sink(event):
        if isinstance(event, Output):
            seen["n"] += len(event.token_ids)
            if "B" in ids:
                order.extend("A" * len(event.token_ids))
            if seen["n"] == at_token:
                ids["B"] = engine.submit(b_prompt, SamplingParams(max_tokens=3, **GREEDY), b_sink)
            elif then is not None and seen["n"] > at_token:
                then(ids, seen["n"])
        elif isinstance(event, Done | Failed):
            done["A"].set()

    ids["A"] = engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=40, **GREEDY), a_sink)
    assert done["A"].wait(60)
    ids["b_events"] = b_events
    ids["b_done"] = done["B"]
    return order, ids


@pytest.mark.parametrize("chunk, least, most", [(16, 5, 40), (128, 0, 1)])
def test_a_running_stream_keeps_getting_tokens_while_a_long_prompt_prefills(tiny, chunk, least, most):
    model, tok = tiny
    engine = started(model, tok, max_batch=4, prefill_chunk=chunk)
    try:
        order, ids = a_then_b(engine, LONG)
        assert ids["b_done"].wait(60)
    finally:
        engine.stop()
    before_b = order.index("B")  # A's tokens between B's arrival and B's first token
    # chunk 16: B's 100 positions take 7 steps, each with a decode step for A (7 tokens: A's next
    # step right after B arrived, then one per chunk but the last); chunk 128: one step, A waits
    assert least <= before_b <= most
    if chunk == 16:
        assert before_b == 7
    assert engine.stats.prefill_chunks == 1 + -(-len(LONG) // chunk)


# --- cancel, failure, KV accounting --------------------------------------------------------------


def test_cancel_mid_prefill_frees_the_slot_and_the_cache(tiny):
    model, tok = tiny
    engine = started(model, tok, max_batch=2, prefill_chunk=16)
    c_queue: queue.Queue = queue.Queue()
    partial = {}

    def cancel_b(ids, n):
        if n == 3:  # B (admitted one step after it arrived) has prefilled one chunk of 16
            (b,) = [r for r in engine._prefilling if r.id == ids["B"]]
            partial["done"] = b.prefill.done
            partial["cache"] = weakref.ref(b.prefill.cache)
            # C waits: A runs, B holds the other slot while it prefills
            ids["C"] = engine.submit(LONG[:20], SamplingParams(max_tokens=4, **GREEDY), c_queue.put)
            partial["waiting, prefilling"] = engine.waiting, engine.prefilling  # (a sink's assert is only logged)
            engine.abort(ids["B"])

    try:
        _, ids = a_then_b(engine, LONG, then=cancel_b)
        c = collect(c_queue)  # C got B's slot and finished
        (c_alone,) = run_all(engine, [(LONG[:20], dict(max_tokens=4, **GREEDY))])
    finally:
        engine.stop()
    assert partial["done"] == 16 and partial["waiting, prefilling"] == (1, 1)
    assert ids["b_events"] == []  # an aborted request is sent nothing (its client is gone)
    assert engine.stats.aborted == 1 and engine.prefilling == 0 and engine.running == 0 and engine.kv_tokens == 0
    assert engine.stats.prompt_tokens == 4 + 16 + 20 + 20
    gc.collect()
    assert partial["cache"]() is None  # B's partial cache is gone
    assert c["tokens"] == c_alone["tokens"]


def test_a_failing_chunk_fails_only_its_request(tiny):
    model, tok = tiny
    poison = max(set(range(320)) - set(LONG))  # fails any prefill chunk that holds it (decode steps never see it)

    def hook(module, args):
        ids = args[0]
        if ids.shape[-1] > 1 and (ids == poison).any():
            raise RuntimeError("injected chunk fault")

    bad = LONG[:40] + [poison] + LONG[40:60]  # in the third chunk of 16
    handle = model.model.embed_tokens.register_forward_pre_hook(hook)
    engine = started(model, tok, max_batch=4, prefill_chunk=16)
    try:
        order, ids = a_then_b(engine, bad)
        assert ids["b_done"].wait(60)
        (after,) = run_all(engine, [(LONG[:30], dict(max_tokens=3, **GREEDY))])  # still serving
    finally:
        engine.stop()
        handle.remove()
    (failed,) = ids["b_events"]
    assert isinstance(failed, Failed) and "injected chunk fault" in failed.message
    assert order == ["A"] * 39  # A's tokens after B arrived: every one of them, none lost
    assert engine.stats.restarts == 0 and engine.prefilling == 0 and len(after["tokens"][0]) == 3
    assert engine.stats.prompt_tokens == 4 + 32 + 30  # B got two chunks in before the third failed


def test_prefills_in_progress_count_against_the_kv_budget(tiny):
    model, tok = tiny
    kw = dict(max_tokens=10, **GREEDY)
    cases = [(list(range(20 + i, 60 + i)), kw) for i in range(4)]  # 40 + 10 positions each
    engine = started(model, tok, max_batch=8, max_kv_tokens=120, prefill_chunk=8)  # two of them, not three
    seen = []
    prefill_step = engine._prefill

    def watched():
        seen.append((engine.running + engine.prefilling, engine.kv_tokens))
        prefill_step()

    engine._prefill = watched
    try:
        got = run_all(engine, cases)
    finally:
        engine.stop()
    alone = started(model, tok, max_batch=8, batched=False)
    try:
        want = run_all(alone, cases)
    finally:
        alone.stop()
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert max(n for n, _ in seen) == 2 and max(kv for _, kv in seen) <= 120


# --- prompt log-probs ride the same chunks ----------------------------------------------------------


@pytest.mark.parametrize("prefill_chunk, logprobs_chunk, rows", [(16, 4096, 16), (1000, 16, 16), (16, 10, 10)])
def test_prompt_logprobs_with_chunked_prefill(prefill_chunk, logprobs_chunk, rows):
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([LONG])).logits[0].float(), -1)
        ref = model.generate(torch.tensor([LONG]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(LONG):].tolist()
    shapes: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(out.shape[-2]))
    engine = started(model, tok, max_batch=2, prefill_chunk=prefill_chunk, prompt_logprobs_chunk=logprobs_chunk)
    try:
        r = collect_one(engine, LONG, dict(max_tokens=3, prompt_logprobs=2, logprobs=1, **GREEDY))
    finally:
        engine.stop()
        handle.remove()
    assert max(shapes) == rows  # the chunk: never the whole prompt's logits
    entries = r["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(LONG)
    expected = full[:-1].gather(1, torch.tensor(LONG[1:]).view(-1, 1)).view(-1)
    torch.testing.assert_close(torch.tensor([e[0] for e in entries[1:]]), expected, rtol=1e-4, atol=1e-4)
    assert [[t for t, _ in e[1]] for e in entries[1:]] == full[:-1].topk(2, -1).indices.tolist()
    assert r["tokens"][0] == ref


def collect_one(engine: Engine, prompt: list[int], kw: dict) -> dict:
    (r,) = run_all(engine, [(prompt, kw)])
    return r


# --- the option -------------------------------------------------------------------------------


def test_prefill_chunk_option():
    from llmslim.server import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    assert parser.parse_args(["serve", "ckpt", "--prefill-chunk", "64"]).prefill_chunk == 64
    assert parser.parse_args(["serve", "ckpt"]).prefill_chunk is None  # the engine's default
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "ckpt", "--prefill-chunk", "0"])
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    assert Engine(model, tok).prefill_chunk == PREFILL_CHUNK
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=0)


def test_build_passes_the_chunk_and_metrics_show_prefills():
    from tests.server.conftest import start, stop

    running = start(prefill_chunk=8)
    try:
        assert running.engine.prefill_chunk == 8
        r = running.client().completions.create(model="tiny", prompt=LONG[:30], max_tokens=2)
        assert r.usage.prompt_tokens == 30
        import httpx

        text = httpx.get(f"{running.url}/metrics").text
        assert "llmslim_requests_prefilling 0" in text and "llmslim_prefill_chunks_total 4" in text
        assert "llmslim_prompt_tokens_total 30" in text
    finally:
        stop(running)

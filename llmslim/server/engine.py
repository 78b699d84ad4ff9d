"""The embedded engine: continuous batching over the model's own forward, on one thread.

One background thread owns the model. Each iteration (an engine step) it

1. drops aborted requests (client gone) from the queue, from the prefills in progress and from
   the running batch,
2. admits waiting requests, oldest first, while batch slots (and the KV budget) allow: each
   starts the prefill of its prompt, alone (batch 1) in a cache of its own (``kvbatch.Prefill``),
3. runs at most ``prefill_chunk`` prompt positions of the prefills in progress, oldest first,
   each continuing its cache from its previous chunk; a request whose prompt is done chooses
   its first token and its ``n`` choices join the running batch as rows of a left-padded KV
   cache (``kvbatch.PaddedBatch``),
4. runs one decode step for every running row in a single forward, picks each row's next
   token with that row's own parameters and generator, and retires finished rows.

So requests join and leave between decode steps; nothing waits for a whole batch to finish,
and a long prompt delays the running rows by one chunk per step, not by its whole prefill
(vLLM's chunked prefill, except that a step's chunks and its decode are separate forwards).
When the last request leaves, the engine hands the memory its steps freed back to the OS
(``util.release_free_memory``): glibc would keep it resident otherwise.
Results go to each request's ``sink`` (a thread-safe callback the HTTP layer provides).
The queue is bounded: ``submit`` raises ``QueueFull`` instead of letting latency grow without
limit. Prompt and output lengths are checked by the caller (``check_lengths``) and capped here
as a backstop. With a KV budget (``max_kv_tokens``, or ``max_kv_memory`` in bytes) a request
is admitted only while the running batch's KV cache, at its largest, with every admitted
request in it, stays within it; the others wait their turn (FIFO).

An exception in one request's prefill fails that request only. An exception in a decode step
(a bug, not a bad request: those never get here) fails the running rows, and the loop starts
again with an empty batch; waiting requests and prefills in progress keep their places.
More than ``max_restarts`` failures within ``restart_window`` seconds and the engine goes
down: every request fails, ``submit`` raises ``EngineDown`` at once (never a request that
waits forever), ``/health`` answers 503 and ``on_down`` is called (the CLI exits then, so a
supervisor restarts the process).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.cache import mergeable
from ..runtime.model_info import eos_ids, model_context
from ..runtime.sampling import LogitsProcessor, Sampler, SamplingParams, argmax_rows
from ..runtime.stops import StopStrings
from ..util import release_free_memory
from .kvbatch import PaddedBatch, Prefill, prefill
from .metrics import EngineStats
from .outputs import Detokenizer, TopLogprobs, token_logprobs

log = logging.getLogger("llmslim.server")

# Prompt positions one engine step prefills (``--prefill-chunk``). Counted, not timed, on the reference
# model (SmolLM2-135M; serve/prefill_check.py): a position costs 213 MFLOP in the linear layers plus
# 69 kFLOP x its position in attention, so a 512-position chunk is 118 GFLOP at the start of a prompt
# and 254 at 4K positions, against 4.9 for a 16-row decode step at 512 positions: while a long prompt
# prefills, a running stream's next token waits for 24-52 decode steps' worth of arithmetic more, not
# for the whole prompt (~290 for 4K). 512 rather than 256: it is the key block of PyTorch's CPU
# flash attention, and chunks of it gave the very bits of one whole-prompt forward on the int4 and
# fp32 paths (256 did not at 1500 tokens); prompts up to 512 are prefilled in one forward, as before.
PREFILL_CHUNK = 512


# --- what a request's sink receives ---------------------------------------------------------------


@dataclass
class PromptLogprobs:
    """Sent first when prompt log-probs were asked for (echo): entry 0 is None (no context)."""

    entries: list[tuple[float, TopLogprobs] | None]


@dataclass
class Output:
    """New tokens of choice ``index`` since its last output; ``finish_reason`` set on its last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[tuple[float, TopLogprobs]] | None
    finish_reason: str | None = None


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    status: int = 500  # 503: the engine is down or shutting down (try again / elsewhere)
    code: str | None = None


Event = PromptLogprobs | Output | Done | Failed
Sink = Callable[[Event], None]


class QueueFull(Exception):
    """The waiting queue is at its bound; the HTTP layer answers 503 with Retry-After."""


class LengthError(ValueError):
    """Prompt or prompt + max_tokens longer than the context the server allows."""


class EngineDown(Exception):
    """The engine is not running (it failed too often, or is shutting down): 503 at once."""


# --- bookkeeping ---------------------------------------------------------------------------------


@dataclass(eq=False)  # one object per request: compared by identity
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    stop_ids: frozenset[int] = frozenset()  # stop_token_ids, and EOS unless ignore_eos
    processor: LogitsProcessor | None = None  # built once, shared by the request's choices
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    unfinished: int = 0
    completion_tokens: int = 0
    prefill: Prefill | None = None  # while admitted and its prompt not yet done
    scored: list = field(default_factory=list)  # prompt log-probs so far (PromptLogprobs.entries)

    @property
    def kv_tokens(self) -> int:
        """The most KV positions the request's rows can need together."""
        return self.params.n * (len(self.prompt) + self.params.max_tokens)


@dataclass
class Sequence:
    """One choice of a request: one row of a running batch."""

    req: Request
    index: int
    sampler: Sampler
    detok: Detokenizer
    stops: StopStrings
    out: list[int] = field(default_factory=list)
    # Text decoded but not sent yet: what a stop string could still claim (its longest length
    # minus one; nothing when there are no stop strings). Everything before it has been sent,
    # so no step touches the whole text (which would make a long output quadratic).
    unsent: str = ""
    finish_reason: str | None = None


@dataclass
class Group:
    """A padded KV batch and its rows, in row order (one group for all rows when batching)."""

    batch: PaddedBatch
    seqs: list[Sequence]


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        max_model_len: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        batched: bool = True,
        max_kv_tokens: int | None = None,
        max_kv_memory: int | None = None,
        prompt_logprobs_chunk: int | None = None,
        max_restarts: int = 3,
        restart_window: float = 60.0,
        on_down: Callable[[str], None] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = model_context(model, max_model_len)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.batched = batched
        self.vocab_size = model.get_input_embeddings().num_embeddings
        # ids past the vocabulary (tiny test configs carry GPT-2's 50256) can never be sampled
        self.eos_ids = frozenset(t for t in eos_ids(model, tokenizer) if 0 <= t < self.vocab_size)
        # echo + logprobs: prompt positions per forward, so that their logits (and log-softmax)
        # take about 64 MB whatever the prompt's length
        self.prompt_logprobs_chunk = prompt_logprobs_chunk or max(16, 2**24 // self.vocab_size)
        self.kv_bytes_per_token: int | None = None
        if max_kv_memory is not None:
            if max_kv_tokens is not None:
                raise ValueError("give max_kv_tokens or max_kv_memory, not both")
            self.kv_bytes_per_token = kv_bytes_per_token(model)
            max_kv_tokens = max_kv_memory // self.kv_bytes_per_token
            if max_kv_tokens < 1:
                raise ValueError(f"a KV budget of {max_kv_memory} bytes holds no token "
                                 f"({self.kv_bytes_per_token} bytes each)")
        self.max_kv_tokens = max_kv_tokens
        self.max_restarts, self.restart_window, self.on_down = max_restarts, restart_window, on_down
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []  # admitted, prompt not done yet (oldest first)
        self._aborts: set[str] = set()
        self._groups: list[Group] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._down = False  # no more requests: failed too often, or stopped
        self._failures: list[float] = []
        self._worked = True  # since the engine was last idle (loading counts: the first idle trims)
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the engine went down: /health turns 503

    # --- API for the HTTP layer (any thread) ---

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmslim-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return not self._down and self._thread is not None and self._thread.is_alive()

    def check_lengths(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len > self.max_model_len:
            raise LengthError(f"This model's maximum context length is {self.max_model_len} tokens, "
                              f"but the prompt has {prompt_len} tokens. Shorten the prompt.")
        if prompt_len + max_tokens > self.max_model_len:
            raise LengthError(f"This model's maximum context length is {self.max_model_len} tokens. "
                              f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                              f"prompt, {max_tokens} for the completion). Reduce the prompt or max_tokens.")

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> str:
        """Queue a request; raises ``QueueFull``, ``LengthError`` or ``ValueError`` (bad ids / n)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        if any(t >= self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} is more than the server's batch size ({self.max_batch})")
        self.check_lengths(len(prompt), params.max_tokens)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        req = Request(f"{next(self._ids)}", list(prompt), params, sink, stop_ids,
                      LogitsProcessor(params, prompt, stop_ids))
        if self.max_kv_tokens is not None and req.kv_tokens > self.max_kv_tokens:
            raise ValueError(f"the request needs up to {req.kv_tokens} KV cache positions (n x (prompt + "
                             f"max_tokens)); this server's KV budget is {self.max_kv_tokens}")
        with self._cond:
            if self._down or self._stop or self._thread is None or not self._thread.is_alive():
                raise EngineDown(f"the engine is down ({self.error or 'not running'}); retry later")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the server's queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(req)
            self._cond.notify()
        return req.id

    def abort(self, rid: str) -> None:
        """Stop request ``rid`` at the next step (no-op when it already finished)."""
        with self._cond:
            self._aborts.add(rid)
            self._cond.notify()

    @property
    def running(self) -> int:
        return sum(len(g.seqs) for g in self._groups)

    @property
    def prefilling(self) -> int:
        """Requests admitted whose prompt is still being prefilled."""
        return len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_tokens(self) -> int:
        """KV cache positions the running batch may reach, with the prefills in progress joined
        (rows x (columns + most tokens left))."""
        return self._footprint(tuple(self._prefilling))

    def _footprint(self, joining: tuple[Request, ...] = ()) -> int:
        """KV positions of the running batch at its largest once the requests ``joining`` (mid-prefill,
        or about to be admitted) have joined it. A padded batch holds every row at the longest row's
        width, so it is counted that way, not as a sum of row lengths."""
        total = 0
        groups = [(len(g.seqs), g.batch.length,
                   max((s.req.params.max_tokens - len(s.out) for s in g.seqs), default=0)) for g in self._groups]
        if joining and not self.batched:  # each request decodes alone
            total += sum(r.kv_tokens for r in joining)
        elif joining:  # all join the first group (or start it)
            rows, width, left = groups[0] if groups else (0, 0, 0)
            rows += sum(r.params.n for r in joining)
            width = max(width, *(len(r.prompt) for r in joining))
            left = max(left, *(r.params.max_tokens for r in joining))
            groups[:1] = [(rows, width, left)]
        return total + sum(rows * (width + left) for rows, width, left in groups)

    # --- the loop (engine thread only) ---

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._serve():
                    pass
        finally:
            self._fail_all("the server is shutting down", 503, "shutting_down")
            with self._cond:
                self._down = True

    def _serve(self) -> bool:
        """Run the loop; True when stopped, False after a failure it recovered from."""
        try:
            while True:
                with self._cond:
                    idle = not (self._stop or self._waiting or self._prefilling or self._groups or self._aborts)
                if idle and self._worked:
                    # The last request just left. Prefills and KV buffers that grew while rows came and
                    # went leave holes in glibc's heaps that it keeps resident (tens of MB on
                    # SmolLM2-135M): hand them back now, between requests, never inside a step.
                    self._worked = False
                    release_free_memory()
                with self._cond:
                    while not (self._stop or self._waiting or self._prefilling or self._groups or self._aborts):
                        self._cond.wait()
                    if self._stop:
                        return True
                    aborts, self._aborts = self._aborts, set()
                self._worked = True
                self._drop(aborts)
                self._admit()
                self._prefill()
                if self._groups:
                    self._decode()
        except Exception as e:  # a bug, not a bad request
            log.exception("engine step failed")
            reason = f"{type(e).__name__}: {e}"
            running, self._groups = self._groups, []
            for req in {id(s.req): s.req for g in running for s in g.seqs}.values():
                _send(req, Failed(f"engine error: {reason}", 500, "engine_error"))
            now = time.monotonic()
            self._failures = [t for t in self._failures if now - t < self.restart_window] + [now]
            if len(self._failures) > self.max_restarts:
                self._go_down(reason)
                return True
            self.stats.restarts += 1
            log.warning("engine restarted after: %s (%d of %d restarts in %.0f s)", reason,
                        len(self._failures), self.max_restarts, self.restart_window)
            return False

    def _go_down(self, reason: str) -> None:
        log.error("engine down after %d failures within %.0f s: %s", len(self._failures), self.restart_window, reason)
        with self._cond:
            self.error = f"{len(self._failures)} failures within {self.restart_window:.0f} s, the last: {reason}"
            self._down = True
        self._fail_all(f"the engine is down: {self.error}", 503, "engine_down")
        if self.on_down is not None:
            try:
                self.on_down(self.error)
            except Exception:
                log.exception("on_down failed")

    def _fail_all(self, message: str, status: int = 500, code: str | None = None) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        reqs = ({id(s.req): s.req for g in self._groups for s in g.seqs} | {id(r): r for r in self._prefilling}
                | {id(r): r for r in waiting})
        self._groups, self._prefilling = [], []
        for req in reqs.values():
            _send(req, Failed(message, status, code))

    def _drop(self, aborts: set[str]) -> None:
        if not aborts:
            return
        with self._cond:
            kept = [r for r in self._waiting if r.id not in aborts]
            self.stats.aborted += len(self._waiting) - len(kept)
            self._waiting = deque(kept)
        gone = [r for r in self._prefilling if r.id in aborts]
        if gone:  # mid-prefill: its partial cache goes with it
            self.stats.aborted += len(gone)
            self._prefilling = [r for r in self._prefilling if r.id not in aborts]
            for r in gone:
                r.prefill = None
        for g in self._groups:
            rows = [i for i, s in enumerate(g.seqs) if s.req.id in aborts]
            if rows:
                self.stats.aborted += len({g.seqs[i].req.id for i in rows})
                order = g.batch.remove(rows)
                g.seqs = [g.seqs[i] for i in order]
        self._groups = [g for g in self._groups if g.seqs]

    def _admit(self) -> None:
        """Start the prefill of waiting requests, oldest first, while slots and the KV budget allow."""
        while True:
            with self._cond:
                if not self._waiting:
                    return
                req = self._waiting[0]
                # FIFO: the head waits for enough free slots (a request mid-prefill holds its rows' already)
                free = self.max_batch - self.running - sum(r.params.n for r in self._prefilling)
                if req.params.n > free:
                    return
                if (self.max_kv_tokens is not None and (self._groups or self._prefilling)
                        and self._footprint((*self._prefilling, req)) > self.max_kv_tokens):
                    return  # the head waits until running rows free enough KV memory
                self._waiting.popleft()
            try:
                self._begin(req)
            except Exception as e:  # fail it, keep serving
                log.exception("prefill failed")
                _send(req, Failed(f"prefill failed: {type(e).__name__}: {e}"))

    def _begin(self, req: Request) -> None:
        p = req.params
        scoring = p.prompt_logprobs is not None and len(req.prompt) > 1
        if p.prompt_logprobs is not None:
            req.scored = [None]  # the first position has no context
        if not scoring and p.max_tokens == 0:
            self._start(req, None)  # nothing to compute
            return
        on_logits = None
        chunk = self.prefill_chunk
        if scoring:
            # [chunk, vocab] logits at a time, never [prompt, vocab]: the chunk is also bounded by
            # prompt_logprobs_chunk (larger than the default prefill chunk unless the vocabulary
            # passes 65K: the chunk grid then differs from that of the same prompt unscored)
            chunk = min(chunk, self.prompt_logprobs_chunk)

            def on_logits(start: int, logits: torch.Tensor) -> None:
                targets = req.prompt[start + 1:start + 1 + logits.shape[0]]
                lp = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
                req.scored.extend(token_logprobs(lp, targets, p.prompt_logprobs))

        req.prefill = Prefill(self.model, req.prompt, chunk, on_logits)
        self._prefilling.append(req)

    def _prefill(self) -> None:
        """Run at most ``prefill_chunk`` prompt positions of the prefills in progress, oldest first.

        A chunk is never cut to fit what is left of the budget (its bounds are fixed by its prompt,
        ``kvbatch.Prefill``): it waits for the next step, and a later prefill whose next chunk fits
        (a short prompt, a last chunk) goes now. The oldest always gets its chunk. A failure fails
        that request only."""
        budget = self.prefill_chunk
        for req in tuple(self._prefilling):
            run = req.prefill
            try:
                while not run.finished and run.next_size <= budget:
                    done = run.step()
                    budget -= done
                    self.stats.prompt_tokens += done
                    self.stats.prefill_chunks += 1
                if run.finished:
                    self._prefilling.remove(req)
                    req.prefill = None
                    self._start(req, run)
            except Exception as e:  # e.g. out of memory in one chunk: fail this request, keep serving
                log.exception("prefill failed")
                self._prefilling = [r for r in self._prefilling if r is not req]
                req.prefill = None
                _send(req, Failed(f"prefill failed: {type(e).__name__}: {e}"))
            if budget == 0:
                return

    def _start(self, req: Request, run: Prefill | None) -> None:
        """``req``'s prompt is prefilled (by ``run``; None when nothing needed computing): send its
        prompt log-probs, choose each choice's first token, and let the rows join the running batch."""
        p = req.params
        if p.prompt_logprobs is not None:
            _send(req, PromptLogprobs(req.scored))
        req.unfinished = p.n
        if p.max_tokens == 0:
            for i in range(p.n):
                _send(req, Output(i, "", [], [] if p.logprobs is not None else None, "length"))
            self._finish_request(req)
            return
        seqs = [Sequence(req, i, Sampler(p, i), Detokenizer(self.tokenizer), StopStrings(p.stop))
                for i in range(p.n)]
        for s in seqs:
            self._advance(s, run.last)
        alive = [s for s in seqs if s.finish_reason is None]
        if not alive:
            return
        cache = run.cache
        if self.batched and self._groups and mergeable(cache):
            group = self._groups[0]
        else:
            group = Group(PaddedBatch(self.model), [])
            self._groups.append(group)
            if not mergeable(cache):
                self.batched = False  # e.g. sliding-window caches: decode each request alone
        group.batch.add(cache, len(req.prompt), copies=len(alive))
        group.seqs += alive

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows = 0
        finished = False
        for g in self._groups:
            logits = g.batch.step([s.out[-1] for s in g.seqs])
            best = argmax_rows(logits).tolist()  # one call for every greedy row instead of one per row
            for s, row, token in zip(g.seqs, logits.unbind(0), best, strict=True):
                self._advance(s, row, token)
            rows += len(g.seqs)
            done = [i for i, s in enumerate(g.seqs) if s.finish_reason is not None]
            if done:  # (most steps: nobody finished, nothing to rebuild)
                finished = True
                order = g.batch.remove(done)
                g.seqs = [g.seqs[i] for i in order]
        if finished:
            self._groups = [g for g in self._groups if g.seqs]
        self.stats.observe_step(rows, time.perf_counter() - t0)

    def _advance(self, s: Sequence, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Choose ``s``'s next token from its raw ``logits [vocab]``, update its text, send it.

        ``argmax``: the raw logits' argmax if already known, the greedy choice when nothing
        (penalties, a min_tokens ban) changes the logits."""
        req, p = s.req, s.req.params
        stop_ids = req.stop_ids
        processed = req.processor(logits, s.out)
        if p.greedy and argmax is not None and processed is logits:
            token = argmax
        else:
            token = s.sampler(processed)
        lp = None
        if p.logprobs is not None:
            lp = token_logprobs(torch.log_softmax(logits.float(), -1).view(1, -1), [token], p.logprobs)
        s.out.append(token)
        req.completion_tokens += 1
        self.stats.generation_tokens += 1
        if req.first_token is None:
            req.first_token = time.perf_counter()
            self.stats.ttft.observe(req.first_token - req.arrival)

        if token in stop_ids:  # banned before min_tokens, so this is a real stop
            s.finish_reason = "stop"  # the stop token's own text is not part of the output
            text = s.unsent + s.detok.flush()
        else:
            piece = s.detok.add(token)
            text = s.unsent + piece
            # (a stop string ending in the new piece starts within the unsent text: it holds enough)
            cut = s.stops.find(text, len(text) - len(piece)) if piece else -1
            if cut >= 0:
                text, s.finish_reason = text[:cut], "stop"
            elif len(s.out) >= p.max_tokens or len(req.prompt) + len(s.out) >= self.max_model_len:
                s.finish_reason = "length"
                text += s.detok.flush()
        end = len(text) if s.finish_reason else max(0, s.stops.safe(text))
        s.unsent = text[end:]
        _send(req, Output(s.index, text[:end], [token], lp, s.finish_reason))
        if s.finish_reason:
            self.stats.finished[s.finish_reason] = self.stats.finished.get(s.finish_reason, 0) + 1
            req.unfinished -= 1
            if req.unfinished == 0:
                self._finish_request(req)

    def _finish_request(self, req: Request) -> None:
        self.stats.requests += 1
        self.stats.latency.observe(time.perf_counter() - req.arrival)
        _send(req, Done(len(req.prompt), req.completion_tokens))


def _send(req: Request, event: Event) -> None:
    try:
        req.sink(event)
    except Exception:  # a broken sink (its event loop gone) must not stop the engine
        log.exception("could not deliver an event of request %s", req.id)


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of KV cache one position takes in ``model`` (all layers), measured by a one-token prefill."""
    cache, _ = prefill(model, [0], all_logits=False)
    return sum(layer.keys[0, :, :1].numel() * layer.keys.element_size()
               + layer.values[0, :, :1].numel() * layer.values.element_size() for layer in cache.layers)

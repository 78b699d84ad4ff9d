"""The embedded engine: continuous batching over the model's own forward, on one thread.

One background thread owns the model. Each iteration it

1. drops aborted requests (client gone) from the queue and from the running batch,
2. admits waiting requests while batch slots are free: each prompt is prefilled alone
   (batch 1) and its ``n`` choices join the running batch as rows of a left-padded KV cache
   (``kvbatch.PaddedBatch``),
3. runs one decode step for every running row in a single forward, picks each row's next
   token with that row's own parameters and generator, and retires finished rows.

So requests join and leave between decode steps; nothing waits for a whole batch to finish.
Results go to each request's ``sink`` (a thread-safe callback the HTTP layer provides).
The queue is bounded: ``submit`` raises ``QueueFull`` instead of letting latency grow without
limit. Prompt and output lengths are checked by the caller (``check_lengths``) and capped here
as a backstop.
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
from ..runtime.sampling import Sampler, SamplingParams, process
from ..runtime.stops import StopStrings
from .kvbatch import PaddedBatch, prefill
from .metrics import EngineStats
from .outputs import Detokenizer, TopLogprobs, token_logprobs

log = logging.getLogger("llmslim.server")


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


Event = PromptLogprobs | Output | Done | Failed
Sink = Callable[[Event], None]


class QueueFull(Exception):
    """The waiting queue is at its bound; the HTTP layer answers 503 with Retry-After."""


class LengthError(ValueError):
    """Prompt or prompt + max_tokens longer than the context the server allows."""


# --- bookkeeping ---------------------------------------------------------------------------------


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    unfinished: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    """One choice of a request: one row of a running batch."""

    req: Request
    index: int
    sampler: Sampler
    detok: Detokenizer
    stops: StopStrings
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent
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
        prefill_budget: int = 1024,
        batched: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = model_context(model, max_model_len)
        self.prefill_budget = prefill_budget
        self.batched = batched
        self.vocab_size = model.get_input_embeddings().num_embeddings
        # ids past the vocabulary (tiny test configs carry GPT-2's 50256) can never be sampled
        self.eos_ids = {t for t in eos_ids(model, tokenizer) if 0 <= t < self.vocab_size}
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._groups: list[Group] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # set if the loop died: /health turns 503

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
        return self.error is None and self._thread is not None and self._thread.is_alive()

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
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n} is more than the server's batch size ({self.max_batch})")
        self.check_lengths(len(prompt), params.max_tokens)
        rid = f"{next(self._ids)}"
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the server's queue is full ({self.max_queue} waiting requests); retry later")
            self._waiting.append(Request(rid, list(prompt), params, sink))
            self._cond.notify()
        return rid

    def abort(self, rid: str) -> None:
        """Stop request ``rid`` at the next step (no-op when it already finished)."""
        with self._cond:
            self._aborts.add(rid)
            self._cond.notify()

    @property
    def running(self) -> int:
        return sum(len(g.seqs) for g in self._groups)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- the loop (engine thread only) ---

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self._stop or self._waiting or self._groups or self._aborts):
                            self._cond.wait()
                        if self._stop:
                            break
                        aborts, self._aborts = self._aborts, set()
                    self._drop(aborts)
                    self._admit()
                    if self._groups:
                        self._decode()
        except Exception as e:  # a bug, not a bad request: fail everything, let /health say so
            log.exception("engine loop died")
            self.error = f"{type(e).__name__}: {e}"
            self._fail_all(f"engine error: {self.error}")
        finally:
            self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        reqs = {id(s.req): s.req for g in self._groups for s in g.seqs} | {id(r): r for r in waiting}
        self._groups = []
        for req in reqs.values():
            _send(req, Failed(message))

    def _drop(self, aborts: set[str]) -> None:
        if not aborts:
            return
        with self._cond:
            kept = [r for r in self._waiting if r.id not in aborts]
            self.stats.aborted += len(self._waiting) - len(kept)
            self._waiting = deque(kept)
        for g in self._groups:
            rows = [i for i, s in enumerate(g.seqs) if s.req.id in aborts]
            if rows:
                self.stats.aborted += len({g.seqs[i].req.id for i in rows})
                g.batch.remove(rows)
                g.seqs = [s for i, s in enumerate(g.seqs) if i not in set(rows)]
        self._groups = [g for g in self._groups if g.seqs]

    def _admit(self) -> None:
        budget = self.prefill_budget
        while True:
            with self._cond:
                if not self._waiting:
                    return
                req = self._waiting[0]
                free = self.max_batch - self.running
                # FIFO: the head waits for enough free slots; the budget bounds how long one
                # step's prefills stall the running rows (the first prefill always goes).
                if req.params.n > free or (budget < len(req.prompt) and budget < self.prefill_budget):
                    return
                self._waiting.popleft()
            budget -= len(req.prompt)
            try:
                self._start(req)
            except Exception as e:  # e.g. out of memory in one prefill: fail it, keep serving
                log.exception("prefill failed")
                _send(req, Failed(f"prefill failed: {type(e).__name__}: {e}"))

    def _start(self, req: Request) -> None:
        p = req.params
        want_prompt_lp = p.prompt_logprobs is not None and len(req.prompt) > 1
        if p.max_tokens == 0 and not want_prompt_lp:
            cache, logits = None, None
        else:
            cache, logits = prefill(self.model, req.prompt, all_logits=want_prompt_lp)
        self.stats.prompt_tokens += len(req.prompt)
        if p.prompt_logprobs is not None:
            entries: list = [None]
            if want_prompt_lp:
                lp = torch.log_softmax(logits[:-1].float(), dim=-1)
                entries += token_logprobs(lp, req.prompt[1:], p.prompt_logprobs)
            _send(req, PromptLogprobs(entries))
        req.unfinished = p.n
        if p.max_tokens == 0:
            for i in range(p.n):
                _send(req, Output(i, "", [], [] if p.logprobs is not None else None, "length"))
            self._finish_request(req)
            return
        seqs = [Sequence(req, i, Sampler(p, i), Detokenizer(self.tokenizer), StopStrings(p.stop))
                for i in range(p.n)]
        last = logits[-1:]
        for s in seqs:
            self._advance(s, last[0])
        alive = [s for s in seqs if s.finish_reason is None]
        if not alive:
            return
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
        for g in self._groups:
            logits = g.batch.step([s.out[-1] for s in g.seqs])
            best = logits.argmax(-1).tolist()  # one call for every greedy row instead of one per row
            for s, row, token in zip(g.seqs, logits, best, strict=True):
                self._advance(s, row, token)
            done = [i for i, s in enumerate(g.seqs) if s.finish_reason is not None]
            g.batch.remove(done)
            rows += len(g.seqs)
            g.seqs = [s for s in g.seqs if s.finish_reason is None]
        self._groups = [g for g in self._groups if g.seqs]
        self.stats.observe_step(rows, time.perf_counter() - t0)

    def _advance(self, s: Sequence, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Choose ``s``'s next token from its raw ``logits [vocab]``, update its text, send it.

        ``argmax``: the raw logits' argmax if already known, the greedy choice when nothing
        (penalties, a min_tokens ban) changes the logits."""
        req, p = s.req, s.req.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        processed = process(logits, p, req.prompt, s.out, stop_ids)
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
            s.text += s.detok.flush()
        else:
            piece = s.detok.add(token)
            s.text += piece
            cut = s.stops.find(s.text, len(s.text) - len(piece)) if piece else -1
            if cut >= 0:
                s.text, s.finish_reason = s.text[:cut], "stop"
            elif len(s.out) >= p.max_tokens or len(req.prompt) + len(s.out) >= self.max_model_len:
                s.finish_reason = "length"
                s.text += s.detok.flush()
        end = len(s.text) if s.finish_reason else max(s.sent, s.stops.safe(s.text))
        _send(req, Output(s.index, s.text[s.sent:end], [token], lp, s.finish_reason))
        s.sent = end
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

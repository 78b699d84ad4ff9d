"""Choosing the next token: sampling parameters, logits processing, and the draw.

One implementation for both decode loops (``runtime.generate`` and the server's engine), so a
request gives the same token through either: the same greedy rule, the same filters in the
same order, the same guard against logits that leave no distribution to draw from.

Order of the logits processing follows vLLM (v1): ``logit_bias``, the ``min_tokens`` ban on
stop tokens, repetition / presence / frequency penalties, then temperature, top-k, top-p (as
transformers applies them) and a draw from the sequence's own seeded ``torch.Generator`` (so a
seed reproduces a sample whatever else is in the batch, and the global RNG is never touched).
``LogitsProcessor`` holds what a request's processing needs, built once per request (bias and
banned ids as tensors), so the per-token path builds no sets or lists from the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import ext

# vLLM's _SAMPLING_EPS: a temperature below it is greedy (dividing by it would overflow anyway).
GREEDY_TEMPERATURE = 1e-5
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values: [-100, 100]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float = 1.0  # on prompt and output tokens (HF/vLLM convention)
    presence_penalty: float = 0.0  # OpenAI's, on output tokens only
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # top-n alternatives per generated token; None: no log-probs
    prompt_logprobs: int | None = None  # the same for prompt tokens (echo); None: not computed
    seed: int | None = None
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1: off), got {self.top_k}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} is negative")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias: {bias} for token {token} is outside [-100, 100]")

    @property
    def greedy(self) -> bool:
        """vLLM's rule: temperature below ``GREEDY_TEMPERATURE``, or top-k of 1, takes the argmax."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def new_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """The generator of choice ``index``: choices of one seeded request differ, and repeat."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed + index) % 2**63)
    return g


class LogitsProcessor:
    """A request's logits processing: ``logit_bias``, the ``min_tokens`` ban, penalties.

    Built once per request from its parameters, its prompt and its stop token ids (EOS included
    unless ``ignore_eos``); shared by the request's choices, each passing its own output so far.
    """

    def __init__(self, params: SamplingParams, prompt: list[int], stop_ids: set[int] | frozenset[int]):
        self.params = params
        bias = sorted(params.logit_bias.items())
        self.bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long) if bias else None
        self.bias_values = torch.tensor([v for _, v in bias], dtype=torch.float32) if bias else None
        self.banned = torch.tensor(sorted(stop_ids), dtype=torch.long) if params.min_tokens and stop_ids else None
        self.prompt_ids = (torch.tensor(sorted(set(prompt)), dtype=torch.long)
                           if params.repetition_penalty != 1.0 else None)
        self.penalized = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        # nothing to do for this request at all: the per-token path returns the logits untouched
        self.active = bool(bias) or self.banned is not None or self.prompt_ids is not None or self.penalized

    def __call__(self, logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        """``logits [vocab]`` after processing: a new tensor if anything changed, else ``logits``."""
        if not self.active:
            return logits
        p = self.params
        copied = False
        if self.bias_ids is not None:
            logits = logits.index_add(0, self.bias_ids, self.bias_values.to(logits.dtype))
            copied = True
        if self.banned is not None and len(out) < p.min_tokens:
            logits = logits if copied else logits.clone()
            copied = True
            logits[self.banned] = float("-inf")
        if self.prompt_ids is not None:
            logits = logits if copied else logits.clone()
            copied = True
            # duplicates (a token in both) write the same value twice: no need to dedupe per token
            idx = torch.cat((self.prompt_ids, torch.tensor(out, dtype=torch.long))) if out else self.prompt_ids
            picked = logits[idx]
            # shrink positive logits, push negative ones further down
            logits[idx] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if self.penalized and out:
            logits = logits if copied else logits.clone()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).to(logits.dtype)
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``[vocab]`` or ``[rows, vocab]``, the same ids, by llmslim's C++ op where
    it is built (torch's reads a 49152-wide bf16 row in ~0.19 ms: 2% of a 135M model's batch-1 token)."""
    module = ext.module()
    if module is None or logits.dim() not in (1, 2) or not logits.is_contiguous():
        return logits.argmax(-1)
    return module.argmax_rows(logits.view(-1, logits.shape[-1])).view(logits.shape[:-1])


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from processed ``logits [vocab]``; always an id in ``[0, vocab)``."""
    if params.greedy:
        return int(argmax_rows(logits))
    raw = logits
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        values, idx = logits.topk(min(params.top_k, logits.numel()))
    else:
        values, idx = logits.sort(descending=True)
    if params.top_p < 1.0:
        probs = values.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        values = values.masked_fill(before >= params.top_p, float("-inf"))  # the top token always stays
    probs = values.softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        # Extreme parameters (a temperature near 0 overflowing the logits, penalties leaving no
        # finite logit) or non-finite logits have no distribution to draw from: they degenerate
        # to greedy on the logits before temperature (NaN counting as -inf; among equal logits the
        # first, as argmax does -- not whichever one the sort above put first).
        return int(raw.float().nan_to_num(nan=float("-inf")).argmax())
    pick = torch.multinomial(probs, 1, generator=generator)
    return int(idx[pick])


class Sampler:
    """One sequence's token choice: its parameters and its own generator."""

    def __init__(self, params: SamplingParams, index: int = 0):
        self.params = params
        self.generator = new_generator(params.seed, index)

    def __call__(self, logits: torch.Tensor) -> int:
        """Processed ``logits [vocab]`` of the last position -> the next token id."""
        return sample(logits, self.params, self.generator)

"""Choosing the next token: sampling parameters, logits processing, and the draw.

One implementation for both decode loops (``runtime.generate`` and the server's engine), so a
request gives the same token through either: the same greedy rule, the same filters in the
same order, the same guard against logits that leave no distribution to draw from.

Order of the logits processing follows vLLM: repetition penalty, the ``min_tokens`` ban on
stop tokens, then temperature, top-k, top-p (as transformers applies them) and a draw from the
sequence's own seeded ``torch.Generator`` (so a seed reproduces a sample whatever else is in
the batch, and the global RNG is never touched).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# vLLM's _SAMPLING_EPS: a temperature below it is greedy (dividing by it would overflow anyway).
GREEDY_TEMPERATURE = 1e-5


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

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1: off), got {self.top_k}")

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


def process(logits: torch.Tensor, params: SamplingParams, prompt: list[int], out: list[int],
            stop_ids: set[int]) -> torch.Tensor:
    """``logits [vocab]`` after penalties and the min_tokens ban (a new tensor if anything changed)."""
    if params.repetition_penalty != 1.0:
        logits = logits.clone()
        idx = torch.tensor(sorted(set(prompt) | set(out)), dtype=torch.long)
        picked = logits[idx]
        # shrink positive logits, push negative ones further down
        logits[idx] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and out:
        logits = logits.clone() if params.repetition_penalty == 1.0 else logits
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if len(out) < params.min_tokens and stop_ids:
        logits = logits.clone()
        logits[torch.tensor(sorted(stop_ids), dtype=torch.long)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from processed ``logits [vocab]``; always an id in ``[0, vocab)``."""
    if params.greedy:
        return int(logits.argmax())
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

"""Per-sequence token choice and text: sampling parameters, logits processing, incremental decode.

Order of the logits processing follows vLLM: repetition penalty, the ``min_tokens`` ban on
stop tokens, then temperature, top-k, top-p and a draw from the sequence's own seeded
``torch.Generator`` (so a seed reproduces a sample whatever else is in the batch). Reported
log-probs are those of the raw model distribution, before any processing (vLLM's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


def new_generator(seed: int | None, index: int) -> torch.Generator:
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
    """One token from processed ``logits [vocab]``."""
    if params.greedy:
        return int(logits.argmax())
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
        # finite logit) have no distribution to draw from: they degenerate to greedy.
        return int(idx[values.nan_to_num(nan=float("-inf")).argmax()])
    pick = torch.multinomial(probs, 1, generator=generator)
    return int(idx[pick])


TopLogprobs = list[tuple[int, float]]


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[tuple[float, TopLogprobs]]:
    """For rows of ``logprobs [k, vocab]`` and the token taken at each: (its log-prob, top-n)."""
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.long).view(-1, 1)).view(-1).tolist()
    if top > 0:
        values, idx = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in tokens]
    return list(zip(chosen, tops, strict=True))


class Detokenizer:
    """Text of a growing token list, a piece at a time, never splitting a multi-byte character.

    Decoding a window of the last few tokens (not the whole list) keeps each step O(1) while
    letting the tokenizer merge pieces (byte-level BPE, SentencePiece spaces) correctly.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        window = self.tokens[self.prefix:]
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=self.skip)
        text = self.tokenizer.decode(window, skip_special_tokens=self.skip)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(before):]
        return ""  # an incomplete character: wait for the next token

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=self.skip)
        text = self.tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.tokens)
        return text[len(before):]


class StopStrings:
    """Finds stop strings in growing text and says how much text is safe to send already.

    When streaming, the last ``longest - 1`` characters are held back: they might be the start
    of a stop string, which must never reach the client.
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def find(self, text: str, new_from: int) -> int:
        """Start of the earliest stop string that ends after ``new_from``, or -1."""
        if not self.stop:
            return -1
        start = max(0, new_from - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits, default=-1)

    def safe(self, text: str) -> int:
        """How many characters of ``text`` can be sent now."""
        return len(text) - self.hold if self.stop else len(text)

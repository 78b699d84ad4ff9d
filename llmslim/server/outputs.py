"""What a sequence sends back besides its token ids: incremental text and log-probs.

Token choice itself (sampling parameters, penalties, the draw) is shared with the batch-1 loop
and lives in ``llmslim.runtime.sampling``; stop strings in ``llmslim.runtime.stops``. What is
left here is server-only: streaming text a piece at a time, and the OpenAI log-prob entries.
Reported log-probs are those of the raw model distribution, before any processing (vLLM's
default).
"""

from __future__ import annotations

import torch

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
        self.decode = decoder(tokenizer, skip_special_tokens)
        self.tokens: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text

    def add(self, token: int) -> str:
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(before):]
        return ""  # an incomplete character: wait for the next token

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        self.prefix = self.read = len(self.tokens)
        return text[len(before):]


def decoder(tokenizer, skip_special_tokens: bool):
    """``ids -> text`` as ``tokenizer.decode`` gives it, straight from the Rust tokenizer when the
    transformers wrapper would add nothing (no clean-up of spaces): per token, the wrapper's
    conversions and checks cost more Python than the decode itself."""
    rust = getattr(tokenizer, "_tokenizer", None)
    if rust is not None and callable(getattr(rust, "decode", None)) and \
            not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: rust.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

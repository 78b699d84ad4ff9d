"""Cutting a token stream into scoring windows, one function per named perplexity method.

Every method yields ``Window``\\ s: the model reads ``ids[:-1]`` and the last ``n_pred`` tokens of
``ids`` are scored (each predicted from everything before it in the window). Keeping the methods
as pure functions over token lists makes their edge cases testable without a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UserError

METHODS = ("gptq", "sliding", "rolling")


@dataclass(frozen=True)
class Window:
    ids: list[int]
    n_pred: int

    def __post_init__(self):
        if not 1 <= self.n_pred <= len(self.ids) - 1:
            raise ValueError(f"window of {len(self.ids)} ids cannot score {self.n_pred} tokens")


def gptq_windows(tokens: list[int], seqlen: int, bos: int | None = None) -> list[Window]:
    """The GPTQ paper's method: non-overlapping windows of ``seqlen``; the short tail is dropped.

    Without BOS a window's first token has no context and is not scored (``seqlen - 1`` scored);
    with BOS each window is BOS + ``seqlen - 1`` text tokens, all scored.
    """
    body = seqlen - 1 if bos is not None else seqlen
    n = len(tokens) // body
    if n == 0:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than one window of {body}; "
                        "give more text or a smaller --seqlen")
    return [_window(tokens[i * body:(i + 1) * body], body, bos) for i in range(n)]


def sliding_windows(tokens: list[int], seqlen: int, stride: int, bos: int | None = None) -> list[Window]:
    """The strided method of the transformers docs ("Perplexity of fixed-length models").

    Windows of ``seqlen`` start every ``stride`` tokens; each scores only the tokens that earlier
    windows did not (the docs' ``trg_len``), so every token after the first is scored exactly
    once with at least ``seqlen - stride`` tokens of context. The last windows are shorter, as in
    the docs. With ``stride == seqlen`` this equals ``gptq`` plus the tail.
    """
    if not 1 <= stride <= seqlen:
        raise UserError(f"--stride must be between 1 and --seqlen ({seqlen}), got {stride}")
    _need_two(tokens)
    body = seqlen - 1 if bos is not None else seqlen
    step = min(stride, body)
    windows, prev_end = [], 0
    for begin in range(0, len(tokens), step):
        end = min(begin + body, len(tokens))
        if bos is not None or end - begin > 1:  # a lone token without BOS has nothing to predict it
            windows.append(_window(tokens[begin:end], end - prev_end, bos))
        prev_end = end
        if end == len(tokens):
            break
    return windows


def get_rolling_token_windows(
    token_list: list[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterator[tuple[list[int], list[int]]]:
    """lm-evaluation-harness 0.4.13 ``lm_eval.utils.get_rolling_token_windows``, same semantics.

    Yields ``(input_tokens, pred_tokens)``; score the last ``len(pred_tokens)`` logits.
    """
    if not 1 <= context_len <= max_seq_len:
        raise ValueError("context_len must be in [1, max_seq_len]")
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    # The first window predicts every token, the very first one from the prefix token.
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
    predicted = first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1: window_end - 1],
            token_list[window_end - window_pred_len: window_end],
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """lm-eval's ``make_disjoint_window``: the context without the part that overlaps the targets."""
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def rolling_windows(tokens: list[int], seqlen: int, prefix_token: int) -> list[Window]:
    """lm-eval's ``loglikelihood_rolling``: every token scored, the first from ``prefix_token``.

    lm-eval scores ``(context, continuation)`` pairs by feeding ``(context + continuation)[:-1]``;
    a ``Window`` of ``context + continuation`` scoring ``len(continuation)`` is the same thing.
    """
    if not tokens:
        raise UserError("the text is empty after tokenization; nothing to score")
    pairs = map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_token, seqlen, 1))
    return [Window(ctx + cont, len(cont)) for ctx, cont in pairs]


def _window(body: list[int], n_new: int, bos: int | None) -> Window:
    if bos is not None:
        return Window([bos] + body, n_new)
    # Without BOS the window's first token is context only (what HF's label shift does).
    return Window(body, min(n_new, len(body) - 1))


def _need_two(tokens: list[int]) -> None:
    if len(tokens) < 2:
        raise UserError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")

"""Perplexity by a named method, and divergence from a baseline model in the same pass.

Methods differ by up to ~15% on the same model and text, so every result names its method,
window length, stride, BOS handling and the number of tokens actually scored:

- ``gptq``: non-overlapping windows of ``seqlen``, short tail dropped (GPTQ paper, arXiv:2210.17323).
- ``sliding``: the transformers docs' strided windows; each token scored once with long context.
- ``rolling``: lm-evaluation-harness's ``loglikelihood_rolling`` over the text as one document,
  with its word perplexity, byte perplexity and bits per byte (its wikitext metrics).
"""

from __future__ import annotations

import math
import re
import time

from torch import nn

from ..errors import UserError
from ..runtime.model_info import model_context
from .scoring import TOKEN_BUDGET, score_windows
from .windows import METHODS, gptq_windows, rolling_windows, sliding_windows

DEFAULT_SEQLEN = 2048


def resolve_seqlen(model: nn.Module, seqlen: int | None) -> int:
    """``seqlen`` checked against the model's context; default min(2048, context)."""
    context = model_context(model)
    if seqlen is None:
        return min(DEFAULT_SEQLEN, context)
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    if seqlen > context:
        raise UserError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens")
    return seqlen


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    # verbose=False: a whole corpus is "longer than the model maximum" by design; it is windowed.
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False))


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    method: str = "gptq",
    seqlen: int | None = None,
    stride: int | None = None,
    add_bos: bool = False,
    max_tokens: int | None = None,
    baseline: tuple[nn.Module, object] | None = None,
    token_budget: int = TOKEN_BUDGET,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``text``; with ``baseline=(model, tokenizer)`` also mean
    KL(baseline || model), top-1 agreement and the baseline's perplexity on the same windows.

    ``add_bos`` prefixes every ``gptq``/``sliding`` window with BOS (then all its text tokens are
    scored). ``rolling`` always predicts the first token from BOS (EOS if there is none) and
    tokenizes with the tokenizer's default special tokens, exactly like lm-eval.
    ``max_tokens`` keeps only the first tokens of the text (quick runs).
    """
    if method not in METHODS:
        raise UserError(f"unknown perplexity method {method!r}; choose one of: {', '.join(METHODS)}")
    if stride is not None and method != "sliding":
        raise UserError(f"--stride applies only to --ppl-method sliding, not {method}")
    if max_tokens is not None and max_tokens < 2:
        raise UserError(f"--ppl-tokens must be at least 2, got {max_tokens}")
    seqlen = resolve_seqlen(model, seqlen)
    bos = _special(tokenizer, "bos") if add_bos and method != "rolling" else None
    all_tokens = encode(tokenizer, text, add_special_tokens=method == "rolling")
    tokens = all_tokens[:max_tokens]
    if baseline is not None:
        check_same_tokenizer(tokenizer, baseline[1], text, tokens, method == "rolling")

    result: dict = {"method": method, "seqlen": seqlen, "add_bos": add_bos}
    if method == "gptq":
        windows = gptq_windows(tokens, seqlen, bos)
        result["stride"] = seqlen
    elif method == "sliding":
        stride = stride if stride is not None else max(1, seqlen // 2)
        windows = sliding_windows(tokens, seqlen, stride, bos)
        result["stride"] = stride
    else:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _special(tokenizer, "eos")
        windows = rolling_windows(tokens, seqlen, prefix)
        result.update(stride=seqlen, add_bos=True, prefix_token=tokenizer.convert_ids_to_tokens(prefix))

    started = time.perf_counter()
    scores = score_windows(model, windows, None if baseline is None else baseline[0], token_budget,
                           progress=progress, desc=f"perplexity ({method})")
    nll = math.fsum(s.nll for s in scores)
    n = sum(s.n for s in scores)
    result.update(
        text_tokens=len(tokens), windows=len(windows), tokens_scored=n, nll_mean=nll / n,
        perplexity=math.exp(nll / n), seconds=round(time.perf_counter() - started, 2),
    )
    if method == "rolling":
        result.update(rolling_metrics(text if len(tokens) == len(all_tokens) else None, nll))
    if baseline is not None:
        result["divergence"] = {
            "kl_mean": math.fsum(s.kl for s in scores) / n,
            "top1_agreement": sum(s.agree for s in scores) / n,
            "baseline_perplexity": math.exp(math.fsum(s.base_nll for s in scores) / n),
            "tokens": n,
        }
    return result


def rolling_metrics(text: str | None, nll: float) -> dict:
    """lm-eval's wikitext metrics for one document (its ``count_words``/``count_bytes``).

    Only defined when the whole text was scored; ``None`` (truncated text) gives none.
    """
    if text is None:
        return {}
    words = len(re.split(r"\s+", text))
    nbytes = len(text.encode("utf-8"))
    return {
        "words": words,
        "bytes": nbytes,
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / nbytes),
        "bits_per_byte": nll / nbytes / math.log(2),
    }


def check_same_tokenizer(tokenizer, other, text: str, tokens: list[int], special: bool) -> None:
    """KL divergence compares distributions id by id: both must tokenize identically."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise UserError("the model and the baseline have different tokenizer vocabularies; "
                        "KL divergence needs the same tokenizer")
    if encode(other, text, add_special_tokens=special)[: len(tokens)] != tokens:
        raise UserError("the model and the baseline tokenize the text differently; "
                        "KL divergence needs the same tokenizer")


def _special(tokenizer, kind: str) -> int:
    value = getattr(tokenizer, f"{kind}_token_id", None)
    if value is None:
        raise UserError(f"the tokenizer has no {kind.upper()} token" + ("; drop --bos" if kind == "bos" else ""))
    return value


"""Zero-shot scoring by log-likelihood, the way lm-evaluation-harness 0.4.13 does it.

- pair encoding: trailing spaces of the context move to the continuation; the continuation's
  tokens are ``encode(context + continuation)[len(encode(context)):]``; an empty context is
  replaced by the prefix token (BOS, else EOS);
- ``acc``: the choice with the highest summed log-likelihood (first on ties, like ``np.argmax``);
  ``acc_norm``: the same divided by the choice's length in characters;
- standard error: sample standard deviation / sqrt(n) (lm-eval's ``mean_stderr``).
"""

from __future__ import annotations

import math
import time

from torch import nn

from ..errors import UserError
from ..runtime.model_info import model_context
from .ppl import encode
from .scoring import TOKEN_BUDGET, score_windows
from .tasks import Doc, Task, get_task
from .windows import Window


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``TemplateLM._encode_pair`` plus its empty-context rule."""
    if context == "":
        cont = encode(tokenizer, continuation)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise UserError("the tokenizer has neither BOS nor EOS to condition an empty context on")
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    # The tokenizer's default special tokens, as lm-eval's tok_encode uses (a BOS, if it adds one).
    whole = encode(tokenizer, context + continuation, add_special_tokens=True)
    ctx = encode(tokenizer, context, add_special_tokens=True)
    return ctx, whole[len(ctx):]


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    pairs: list[tuple[str, str]],
    token_budget: int = TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), is_greedy)`` for every pair, batched."""
    max_len = model_context(model)
    windows = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise UserError(f"continuation {continuation!r} encodes to no tokens")
        if len(cont) > max_len:
            raise UserError(f"a continuation of {len(cont)} tokens exceeds the model's context of {max_len}")
        # Too long for the context: keep the right end, as lm-eval does.
        windows.append(Window((ctx + cont)[-(max_len + 1):], len(cont)))
    scores = score_windows(model, windows, token_budget=token_budget, progress=progress, desc=desc)
    return [(-s.nll, s.greedy) for s in scores]


def evaluate_docs(
    model: nn.Module,
    tokenizer,
    docs: list[Doc],
    kind: str = "multiple_choice",
    token_budget: int = TOKEN_BUDGET,
    progress: bool = True,
    desc: str = "task",
) -> dict:
    """acc (+ acc_norm where defined), their standard errors and the chance level over ``docs``."""
    if not docs:
        raise UserError("the task has no examples to score")
    pairs = [p for d in docs for p in zip(d.contexts, d.continuations, strict=True)]
    return score_docs(docs, loglikelihoods(model, tokenizer, pairs, token_budget, progress, desc), kind)


def score_docs(docs: list[Doc], results: list[tuple[float, bool]], kind: str = "multiple_choice") -> dict:
    """The metrics from ``loglikelihoods`` results, in the order of ``docs``' pairs."""
    it = iter(results)
    per_doc = [[next(it) for _ in d.contexts] for d in docs]
    if kind == "last_word":
        acc = [float(r[0][1]) for r in per_doc]
        lls = [r[0][0] for r in per_doc]
        return {"n": len(docs), **_mean("acc", acc), "perplexity": math.exp(-sum(lls) / len(lls)), "chance": None}
    acc, acc_norm = [], []
    for d, r in zip(docs, per_doc, strict=True):
        lls = [ll for ll, _ in r]
        acc.append(float(_argmax(lls) in d.gold))
        if d.norm_lengths is not None:
            acc_norm.append(float(_argmax([ll / n for ll, n in zip(lls, d.norm_lengths, strict=True)]) in d.gold))
    out = {"n": len(docs), **_mean("acc", acc)}
    if len(acc_norm) == len(docs):
        out.update(_mean("acc_norm", acc_norm))
    out["chance"] = sum(len(d.gold) / len(d.contexts) for d in docs) / len(docs)
    return out


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: str | Task,
    limit: int | None = None,
    token_budget: int = TOKEN_BUDGET,
    progress: bool = True,
    docs: list[Doc] | None = None,
) -> dict:
    """Run one named task (``available_tasks()``); ``limit`` keeps its first N examples.

    ``docs``: the task's examples if already loaded (the CLI fetches hub tasks before the model).
    """
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    task = get_task(task) if isinstance(task, str) else task
    started = time.perf_counter()
    docs = task.load(limit) if docs is None else docs
    out = {"task": task.name, "source": task.source, "formulation": task.formulation, "limit": limit}
    out.update(evaluate_docs(model, tokenizer, docs, task.kind, token_budget, progress, desc=task.name))
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(name: str, xs: list[float]) -> dict:
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return {name: mean, f"{name}_stderr": None}
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return {name: mean, f"{name}_stderr": math.sqrt(var) / math.sqrt(len(xs))}

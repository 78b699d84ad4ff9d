"""The one forward loop every metric shares: batched windows in, per-window log-likelihoods out.

Full-vocabulary logits exist only for the batch being scored and are reduced to a few numbers
per window in chunks of positions, so memory stays bounded whatever the length of the text
(SmolLM2's vocabulary is 49,152: one 2048-token window of float32 logits is 400 MB).
With a baseline model, the same batch goes through both models and KL divergence and top-1
agreement are reduced in the same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .windows import Window

# Tokens per forward: bounds the batch's logits to TOKEN_BUDGET * vocab * 4 bytes (~0.8 GB at
# SmolLM2's vocabulary). On CPU, bigger batches barely speed things up; on GPU they do.
TOKEN_BUDGET = 4096
# Positions per log-softmax chunk: a chunk's float32 temporaries stay ~100 MB.
CHUNK = 512


@dataclass
class WindowScore:
    nll: float  # sum of -log p(target) over the window's scored tokens
    n: int  # tokens scored
    greedy: bool  # every scored token was the model's argmax (lm-eval's is_greedy)
    kl: float = 0.0  # sum over scored positions of KL(baseline || model)
    agree: int = 0  # scored positions where both models' argmax agree
    base_nll: float = 0.0  # the baseline's own -log p sum, for its perplexity on the same windows


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.to(model_device(model)), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.inference_mode()
def score_windows(
    model: nn.Module,
    windows: list[Window],
    baseline: nn.Module | None = None,
    token_budget: int = TOKEN_BUDGET,
    pad_id: int = 0,
    progress: bool = True,
    desc: str = "scoring",
) -> list[WindowScore]:
    """Score every window (in its original order), batching windows up to ``token_budget`` tokens.

    Windows of unequal length are right-padded without an attention mask, as lm-eval does: a
    causal model's logits at real positions cannot see padding that comes after them.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    scores: list[WindowScore | None] = [None] * len(windows)
    bar = tqdm(total=len(windows), desc=desc, unit="win", disable=not progress, leave=False)
    start = 0
    while start < len(order):
        width = len(windows[order[start]].ids) - 1  # longest first, so this is the batch width
        size = max(1, token_budget // max(width, 1))
        batch = order[start:start + size]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            w = windows[i].ids[:-1]
            ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
        logits = forward_logits(model, ids)
        base = forward_logits(baseline, ids) if baseline is not None else None
        if base is not None and base.shape[-1] != logits.shape[-1]:
            raise UserError(f"the model predicts {logits.shape[-1]} token ids but the baseline {base.shape[-1]}; "
                            "they do not share a tokenizer")
        for row, i in enumerate(batch):
            scores[i] = _reduce(windows[i], logits[row], None if base is None else base[row])
        del logits, base
        bar.update(len(batch))
        start += len(batch)
    bar.close()
    return scores  # type: ignore[return-value]


def _reduce(window: Window, logits: torch.Tensor, base: torch.Tensor | None) -> WindowScore:
    """Reduce one window's ``[positions, vocab]`` logits to sums over its scored tokens."""
    inplen = len(window.ids) - 1
    first = inplen - window.n_pred  # logits at position p predict ids[p + 1]
    targets = torch.tensor(window.ids[first + 1:], dtype=torch.long, device=logits.device)
    s = WindowScore(0.0, window.n_pred, True)
    for c in range(0, window.n_pred, CHUNK):
        e = min(c + CHUNK, window.n_pred)  # never into the right padding of a shorter window
        lg = logits[first + c: first + e].float()
        tgt = targets[c:e].unsqueeze(-1)
        lse = torch.logsumexp(lg, dim=-1)
        s.nll += float((lse - lg.gather(-1, tgt).squeeze(-1)).double().sum())
        top = lg.argmax(dim=-1)
        s.greedy = s.greedy and bool((top == tgt.squeeze(-1)).all())
        if base is not None:
            lp = lg - lse.unsqueeze(-1)
            lq = torch.log_softmax(base[first + c: first + e].float(), dim=-1)
            # KL(baseline || model): how much the model's next-token distribution drifted from
            # the original's, weighted by where the original puts its mass (llama.cpp's convention).
            s.kl += float((lq.exp() * (lq - lp)).sum(dim=-1).double().sum())
            s.agree += int((top == lq.argmax(dim=-1)).sum())
            s.base_nll += float(-lq.gather(-1, tgt).double().sum())
    return s

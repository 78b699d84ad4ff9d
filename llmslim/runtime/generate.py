"""A lean batch-1 decode loop: preallocated KV cache, greedy or sampled, stop strings and EOS.

``model.generate`` of transformers is general and pays for it on every token (logits
processors, stopping criteria objects, a growing ``DynamicCache`` that concatenates each
step). At SmolLM2-135M scale with int4 kernels the per-token Python work is a large share of
the time, so this loop does only what batch-1 decoding needs:

- a KV cache preallocated for prompt + ``max_new_tokens`` (``cache.PreallocLayer``: written in
  place, read as views of the filled part; sized in buckets and kept on the model, so
  repeated calls reuse the same memory);
- the next token is chosen from the last position's logits only (``logits_to_keep=1``);
- token choice, stop strings and EOS ids are the server's own (``sampling``, ``stops``,
  ``model_info``), so a request decodes alike through either; sampling uses a local
  ``torch.Generator`` (a ``seed`` makes it reproducible without touching the global RNG);
- stop strings are looked for only in the newly decoded tail of the text.

Greedy output is token-for-token what ``model.generate(do_sample=False)`` produces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache import cache_kwarg, make_cache
from .lean import LeanDecoder
from .model_info import eos_ids
from .sampling import Sampler, SamplingParams
from .stops import StopStrings


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids (an EOS that ended the run included, like transformers)
    text: str  # decoded generated text, special tokens skipped, cut before a stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s, *_tok_s


def _encode(tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return [int(t) for t in prompt]


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | list[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    ignore_eos: bool = False,
) -> GenerationResult:
    """Continue ``prompt`` (text, or token ids used as given) with batch-1 decoding.

    ``temperature=0`` is greedy (as is any temperature below ``sampling.GREEDY_TEMPERATURE``,
    or ``top_k=1``). Ends at an EOS token (unless ``ignore_eos``, for benchmarks), at a stop
    string (the text is cut before it), or after ``max_new_tokens``.
    """
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    sampler = Sampler(SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=seed, stop=stops, ignore_eos=ignore_eos))
    watch = StopStrings(stops)
    eos = set() if ignore_eos else eos_ids(model, tokenizer)
    step = Stepper(model, len(ids) + max_new_tokens)

    t0 = time.perf_counter()
    logits = step(ids) if max_new_tokens else None
    t1 = time.perf_counter()
    out: list[int] = []
    text, reason, cut_by_stop, scanned = "", "length", False, 0
    while len(out) < max_new_tokens:
        token = sampler(logits)
        out.append(token)
        if token in eos:
            reason = "stop"
            break
        if watch.stop:
            text = tokenizer.decode(out, skip_special_tokens=True)
            cut, scanned = watch.find(text, scanned), len(text)
            if cut >= 0:
                text, reason, cut_by_stop = text[:cut], "stop", True
                break
        if len(out) == max_new_tokens:
            break
        logits = step([token])
    t2 = time.perf_counter()
    if not cut_by_stop:
        text = tokenizer.decode(out, skip_special_tokens=True)
    decode_steps = max(len(out) - 1, 0)  # forwards after the prefill
    timings = {
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "prefill_tok_s": len(ids) / (t1 - t0) if t1 > t0 else 0.0,
        "decode_tok_s": decode_steps / (t2 - t1) if decode_steps and t2 > t1 else 0.0,
    }
    return GenerationResult(out, text, reason, len(ids), timings)


class Stepper:
    """Runs the model one chunk at a time on a preallocated cache; returns the last logits.

    Models of a family ``runtime.families`` covers, prepared by ``runtime.fast.accelerate``, run
    through ``LeanDecoder``; every other model through its own ``forward``.
    """

    def __init__(self, model: nn.Module, max_len: int):
        self.model = model
        self.cache = make_cache(model, max_len)
        self.cache_arg = cache_kwarg(model)
        self.lean = LeanDecoder.for_model(model, self.cache)
        self.pos = 0

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        input_ids = torch.tensor(tokens, dtype=torch.long)
        if self.lean is not None:
            logits = self.lean(input_ids, self.pos, self.cache)
        else:
            position_ids = torch.arange(self.pos, self.pos + n).unsqueeze(0)
            out = self.model(input_ids=input_ids[None], position_ids=position_ids, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: self.cache})
            logits = out.logits[0, -1]
        self.pos += n
        return logits

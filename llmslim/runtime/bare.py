"""Serve a checkpoint without importing transformers' modeling code.

``llmslim serve`` on the fast path computes with ``runtime.lean`` and llmslim's kernels only; what
it needs of transformers' model classes is their layout and a few constants. In transformers 5.x
importing a model's config class alone pulls in ``torch.distributed.tensor``, ``torch._dynamo`` and
``sympy`` through its integrations: ~80 MiB resident in a process that uses none of them
(``python eval/import_memory.py``), a large share of a 4-bit SmolLM2 server's whole footprint. So:

1. a child process (``runtime.plan``) builds the model with transformers on the ``meta`` device and
   writes down its layout (``plan``: module sizes, norms' eps, rotary tables, attention scaling,
   the resolved config), cached per checkpoint config and transformers version;
2. this process builds ``BareCausalLM`` from that plan -- plain torch modules under transformers'
   own names, whose forwards compute what transformers' do -- and reads the checkpoint into it with
   the loader transformers' classes use (``formats.gptq``: GPTQ v1/v2 or float safetensors);
3. the tokenizer gets the config as a plain ``PretrainedConfig``, so it never loads the class.

The result goes through ``runtime.fast.accelerate`` like any model; the server then runs it on the
lean forward, bit for bit what the same checkpoint loaded through transformers gives
(tests/runtime/test_bare.py). Anything the plan does not cover (a family outside
``runtime.families``, length-dependent rotary scaling, bitsandbytes, pickled weights) returns None:
the caller loads through transformers as before.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .. import __version__
from ..models import cache_root
from ..util import atomic_write_text
from .families import FAMILIES
from .plan import VERSION

log = logging.getLogger("llmslim.runtime.bare")


class RMSNorm(nn.Module):
    """transformers' RMSNorm: Llama's (cast back, then ``w *``) or Gemma's (``* (1 + w)`` in fp32, then cast)."""

    def __init__(self, dim: int, eps: float, gemma: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device="meta"), requires_grad=False)
        self.variance_epsilon, self.gemma = eps, gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)


class Embedding(nn.Embedding):
    """``nn.Embedding``, times Gemma's ``embed_scale`` (a buffer, cast to the weight's dtype) where it has one."""

    def __init__(self, num: int, dim: int, padding_idx: int | None, scale: float | None, dtype: torch.dtype):
        # a given weight skips nn.Embedding's initializer, whose meta-device path imports torch._dynamo
        super().__init__(num, dim, padding_idx, _weight=torch.empty(num, dim, device="meta", dtype=dtype))
        self.register_buffer("embed_scale", None if scale is None else torch.tensor(scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out if self.embed_scale is None else out * self.embed_scale.to(self.weight.dtype)


class Rotary(nn.Module):
    """transformers' rotary embedding over the tables its constructor computed (one per layer type
    for Gemma 3, keyed "" otherwise): ``(x, positions [.., T]) -> cos, sin [.., T, dim]``."""

    def __init__(self, tables: dict[str, dict]):
        super().__init__()
        self.scaling = {k: t["scaling"] for k, t in tables.items()}
        for k, t in tables.items():
            self.register_buffer(f"{k}_inv_freq", torch.tensor(t["inv_freq"], dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        key = layer_type or ""
        inv_freq = getattr(self, f"{key}_inv_freq")
        freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.scaling[key], emb.sin() * self.scaling[key]
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


ACTIVATIONS = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "gelu": nn.GELU}


class BareCausalLM(nn.Module):
    """A causal LM of a ``runtime.families`` family as ``plan`` lays it out, every tensor on ``meta``
    until a loader fills it. ``forward`` takes transformers' arguments for one sequence."""

    def __init__(self, config, plan: dict, dtype: torch.dtype, generation_config=None):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.name_or_path = getattr(config, "_name_or_path", None)
        self._tied = bool(plan["tied"])
        gemma = FAMILIES[config.model_type].gemma_norm
        for path, spec in plan["modules"].items():  # parents before children (named_modules' order)
            owner, _, name = path.rpartition(".")
            parent = self.get_submodule(owner) if owner else self
            kind = spec["kind"]
            if kind == "linear":
                m = nn.Linear(spec["in"], spec["out"], bias=spec["bias"], device="meta", dtype=dtype)
            elif kind == "embedding":
                m = Embedding(spec["num"], spec["dim"], spec["padding_idx"], spec["scale"], dtype)
            elif kind == "norm":
                m = RMSNorm(spec["dim"], spec["eps"], gemma, dtype)
            elif kind == "activation":
                m = ACTIVATIONS[spec["fn"]]()
            elif kind == "rotary":
                m = Rotary(spec["tables"])
            elif kind == "list":
                m = nn.ModuleList()
            else:
                m = nn.Module()
            for attr, value in spec.get("attrs", {}).items():
                setattr(m, attr, value)
            if isinstance(parent, nn.ModuleList):
                if int(name) != len(parent):
                    raise ValueError(f"plan lists {path} out of order")
                parent.append(m)
            else:
                setattr(parent, name, m)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def tie_weights(self) -> None:
        if self._tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
                logits_to_keep: int = 0, **_) -> SimpleNamespace:
        """``input_ids [1, T]`` at ``position_ids`` (contiguous; default: after what ``cache`` holds) ->
        ``.logits [1, T or logits_to_keep, vocab]``, keys and values added to ``cache`` (a transformers
        ``Cache``; a fresh ``DynamicCache`` when None, returned as ``.cache``)."""
        from transformers import DynamicCache

        from .lean import LeanDecoder

        if input_ids.shape[0] != 1:
            raise ValueError("BareCausalLM.forward takes one sequence (the server batches through runtime.lean)")
        cache = DynamicCache() if cache is None else cache
        pos = int(position_ids.reshape(-1)[0]) if position_ids is not None else cache.get_seq_length()
        lean = LeanDecoder.of(self) or self.__dict__.setdefault("_llmslim_lean", LeanDecoder(self))
        logits = lean.prefill(input_ids[0], pos, cache, all_logits=logits_to_keep != 1)
        if logits_to_keep > 1:
            logits = logits[-logits_to_keep:]
        return SimpleNamespace(logits=logits[None], cache=cache)


def plan(folder: str | Path) -> dict:
    """``runtime.plan``'s description of the checkpoint in ``folder``, from the cache or a child process."""
    folder = Path(folder)
    h = hashlib.sha256(f"{VERSION}:{__version__}:{md.version('transformers')}:{md.version('torch')}".encode())
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    cached = cache_root() / "plans" / f"{h.hexdigest()[:24]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    env = dict(os.environ, TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-m", "llmslim.runtime.plan", str(folder)], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unsupported": f"the layout could not be read ({tail})"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, json.dumps(out))
    return out


def load_bare(folder: str | Path, dtype: torch.dtype) -> tuple[nn.Module, object] | None:
    """``(model, tokenizer)`` for ``folder`` without transformers' model classes, or None where the plan
    does not cover it (the caller loads through transformers)."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        return None
    p = plan(folder)
    if p.get("unsupported"):
        log.info("loading %s through transformers: %s", folder, p["unsupported"])
        return None
    from transformers import GenerationConfig, PretrainedConfig

    from ..formats.gptq import fill, load_gptq
    from ..formats.hf import load_tokenizer
    from ..formats.stream import WeightSource

    config = PretrainedConfig.from_dict(p["config"])
    generation = GenerationConfig.from_dict(p["generation_config"]) if p["generation_config"] else None

    def build(cfg, dt):
        return BareCausalLM(cfg, p, dt, generation)

    if getattr(config, "quantization_config", None):
        model = load_gptq(str(folder), config, dtype, build)
    else:
        model = build(config, dtype)
        fill(model, WeightSource(folder), str(folder), p["tied"])
    model.eval()
    return model, load_tokenizer(str(folder), config=config)

"""OpenAI-compatible serving: an embedded continuous-batching engine, or vLLM.

``build(checkpoint, ...)`` loads a model and returns a ready ``(app, engine)``; the
``llmslim serve`` command (``commands.py``) runs it under uvicorn. See serve/README.md.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("llmslim.server")


def build(
    checkpoint: str,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_model_len: int | None = None,
    max_tokens_cap: int | None = None,
    fast: bool = True,
    batched: bool = True,
    model=None,
    tokenizer=None,
    request_timeout: float | None = None,
    max_kv_tokens: int | None = None,
    max_kv_memory: int | None = None,
    max_body_bytes: int | None = None,
    on_down=None,
    prefill_chunk: int | None = None,
):
    """Load ``checkpoint`` (or use ``model``/``tokenizer`` given) and wire engine and app.

    The engine is started; stop it with ``engine.stop()`` when the server exits. ``on_down``
    is called (from the engine thread) if the engine fails too often to keep restarting.
    """
    from .app import create_app
    from .engine import PREFILL_CHUNK, Engine
    from .state import MAX_BODY_BYTES, ServerState

    if model is None:
        import torch

        from ..loader import load

        # The fast path computes in bf16 and casts every float parameter to it: loading straight in
        # bf16 gives the very same tensors (tests/runtime/test_memory.py) without first holding the
        # embeddings in float32 (SmolLM2-135M: 113 MB more at the load's peak).
        dtype = torch.bfloat16 if fast and fast_path_available() else torch.float32
        loaded = load_bare(checkpoint, dtype) if fast and dtype == torch.bfloat16 else None
        if loaded is not None:
            log.info("%s: loaded without transformers' model classes (runtime.bare)", checkpoint)
        model, tokenizer = loaded or load(checkpoint, dtype=dtype)
    if fast:
        model = accelerate(model)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                    max_model_len=max_model_len, batched=batched, max_kv_tokens=max_kv_tokens,
                    max_kv_memory=max_kv_memory, on_down=on_down, prefill_chunk=prefill_chunk or PREFILL_CHUNK)
    name = served_model_name or os.path.basename(os.path.normpath(checkpoint)) or checkpoint
    names = [name] + ([checkpoint] if checkpoint != name else [])
    state = ServerState(engine, tokenizer, names, api_key=api_key, max_tokens_cap=max_tokens_cap,
                        max_body_bytes=max_body_bytes or MAX_BODY_BYTES, request_timeout=request_timeout)
    app = create_app(state)
    engine.start()
    return app, engine


def load_bare(checkpoint: str, dtype):
    """The checkpoint without transformers' model classes (``runtime.bare``: the same model, less
    memory), or None where that does not cover it."""
    from ..models import resolve
    from ..runtime.bare import load_bare as bare

    return bare(resolve(checkpoint), dtype)


def fast_path_available() -> bool:
    try:
        from ..runtime import fast  # noqa: F401
    except ImportError:
        return False
    return True


def accelerate(model):
    """The fast CPU path (int4/int8 kernels, bf16) when llmslim.runtime.fast provides it."""
    try:
        from ..runtime.fast import accelerate as fast_path
    except ImportError:  # the kernels module is optional; the reference path is always correct
        log.warning("llmslim.runtime.fast is not available; serving on the reference (float) path")
        return model
    return fast_path(model)

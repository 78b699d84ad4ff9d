"""One EOS helper and one context helper for generate, the server and the metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmslim.runtime.model_info import DEFAULT_CONTEXT, eos_ids, model_context
from tests.conftest import make_tiny_model, make_tiny_tokenizer


def test_model_context_with_and_without_a_request():
    model = make_tiny_model("llama")  # max_position_embeddings=256
    assert model_context(model) == 256
    assert model_context(model, 100) == 100
    with pytest.raises(ValueError):
        model_context(model, 257)
    with pytest.raises(ValueError):
        model_context(model, 0)
    assert model_context(make_tiny_model("gpt2")) == 256  # n_positions
    bare = SimpleNamespace(config=SimpleNamespace())
    assert model_context(bare) == DEFAULT_CONTEXT and model_context(bare, 64) == 64
    assert model_context(bare, default=512) == 512
    assert model_context(SimpleNamespace(config=SimpleNamespace(n_ctx=1024))) == 1024


def test_eos_ids_gathers_every_source():
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    model.generation_config.eos_token_id = [5, 6]
    model.config.eos_token_id = 7
    assert eos_ids(model, tok) == {5, 6, 7, tok.eos_token_id}

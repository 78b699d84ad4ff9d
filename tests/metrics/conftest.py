"""Tiny in-memory models for the metrics tests (the tokenizer is tests/conftest.py's ``tiny_tokenizer``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

TEXT = (
    "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. "
    "The quick brown fox jumps over the lazy dog. The article was written in the year 2007 and it "
    "describes an election that was held in November. "
) * 4


def tiny_llama(vocab_size: int, seed: int = 0, context: int = 64) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=context)
    return LlamaForCausalLM(config).eval()


class Rigged(nn.Module):
    """Whatever the input, predicts ``favored`` tokens (uniformly among them) with near certainty."""

    def __init__(self, vocab_size: int, favored: list[int], context: int = 64):
        super().__init__()
        self.config = type("Config", (), {"max_position_embeddings": context})()
        row = torch.full((vocab_size,), -30.0)
        row[favored] = 0.0
        self.register_buffer("row", row)

    def forward(self, input_ids, **kw):
        return CausalLMOutput(logits=self.row.expand(*input_ids.shape, -1).clone())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def text():
    return TEXT

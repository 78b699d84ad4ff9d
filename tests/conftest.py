"""Shared fixtures. Tests never download: models and tokenizers are built in memory."""

from __future__ import annotations

import pytest

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained in memory: encodes any text, fast, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(
        ["Once upon a time there was a little girl named Lily. She liked to play in the park.",
         "The quick brown fox jumps over the lazy dog. The article was written in the year 2007.",
         "def main():\n    return 0\n"],
        trainer=trainer,
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def tiny_tokenizer():
    """A fresh tiny tokenizer with a ChatML chat template (fresh, so a test may change it)."""
    return make_tiny_tokenizer()

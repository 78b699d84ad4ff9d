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


ARCHS = ("llama", "qwen2", "opt", "gpt2", "gpt_neox")


def make_tiny_model(arch: str, vocab_size: int = 320, seed: int = 0):
    """A 2-block random causal LM of the given architecture; every linear packs at 2/3/4/8 bits."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "qwen2":  # q/k/v carry biases
        cfg = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif arch == "opt":
        cfg = T.OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    elif arch == "gpt2":  # Conv1D layers, weights stored [in, out]
        cfg = T.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    elif arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, **common)
    else:
        raise ValueError(arch)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def tiny_folder(tmp_path):
    """Factory: save a tiny model of ``arch`` with the tiny tokenizer as an HF folder; returns the path."""

    def make(arch: str = "llama", name: str = "model"):
        path = tmp_path / f"{name}-{arch}"
        make_tiny_model(arch).save_pretrained(path)
        make_tiny_tokenizer().save_pretrained(path)
        return path

    return make


class BlockCrash:
    """Stops the block driver once, as kill -9 would, right after block 0's checkpoint hits the disk;
    a run after that (``--resume``) goes on. ``saved``: the blocks checkpointed since (clear it before
    resuming to see which blocks the resume redid)."""

    def __init__(self, monkeypatch):
        from llmslim.quant import sequential

        real = sequential.BlockState.save_block
        self.saved: list[int] = []
        self.armed = True

        def save_block(state, i, *a):
            real(state, i, *a)
            self.saved.append(i)
            if self.armed and i == 0:
                self.armed = False
                raise KeyboardInterrupt

        monkeypatch.setattr(sequential.BlockState, "save_block", save_block)


# --- tests that cannot quietly not run ---------------------------------------------------------
# `make test-slow` (and so CI) sets LLMSLIM_FAIL_ON_SKIP=1: there every peer (lm-eval, GPTQModel,
# the reference model) is installed, so a skip means a test silently did not run -- a failure.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    import os

    outcome = yield
    report = outcome.get_result()
    if os.environ.get("LLMSLIM_FAIL_ON_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under LLMSLIM_FAIL_ON_SKIP=1 (every test must run here): {reason}"


# `make test-slow` runs on two xdist workers, whole files to a worker, in collection order
# (--dist loadfile --no-loadscope-reorder). The soak test alone takes about as long as the rest
# together on a 2-core CPU, so files marked `longest` are collected first: each starts on a worker
# of its own at once instead of last, and the other files fill the other worker meanwhile.
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable: order kept otherwise

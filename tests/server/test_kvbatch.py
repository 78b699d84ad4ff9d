"""The padded KV batch: rows joining, leaving and growing give what each row gives alone."""

import pytest
import torch

from llmslim.runtime.cache import cache_kwarg
from llmslim.runtime.fast import accelerate
from llmslim.server.kvbatch import PaddedBatch, prefill
from tests.conftest import make_tiny_model


def alone(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy next-token logits of ``prompt`` decoded by itself (transformers' own cache)."""
    cache, logits = prefill(model, prompt, all_logits=False)
    out, ids = [logits[-1]], list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(out[-1].argmax()))
            r = model(input_ids=torch.tensor([[ids[-1]]]), position_ids=torch.tensor([[len(ids) - 1]]),
                      use_cache=True, **{cache_kwarg(model): cache})
            out.append(r.logits[0, -1])
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-lean"])
def test_rows_join_leave_and_grow(arch):
    model = make_tiny_model(arch.removesuffix("-lean")).eval()
    if arch.endswith("-lean"):  # fused modules: the batch decodes through LeanDecoder.decode_batch
        accelerate(model, torch.float32)
    prompts = [[5, 9, 17], [3, 4, 5, 6, 7, 8, 9, 10], [11] * 5, list(range(20, 40))]
    want = [alone(model, p, 12) for p in prompts]

    batch = PaddedBatch(model)
    live: list[tuple[int, int]] = []  # (prompt index, tokens decoded so far)

    def join(i: int) -> None:
        cache, logits = prefill(model, prompts[i], all_logits=False)
        torch.testing.assert_close(logits[-1], want[i][0], rtol=1e-4, atol=1e-4)
        batch.add(cache, len(prompts[i]))
        live.append((i, 0))

    def step() -> None:
        tokens = [int(want[i][k].argmax()) for i, k in live]
        logits = batch.step(tokens)
        for row, (i, k) in enumerate(live):
            torch.testing.assert_close(logits[row], want[i][k + 1], rtol=1e-4, atol=1e-4)
        live[:] = [(i, k + 1) for i, k in live]

    join(0)
    join(2)  # longer than row 0: row 0 gets more left padding
    for _ in range(3):
        step()
    join(1)  # shorter than the running rows
    step()
    order = batch.remove([0])  # the first row leaves: padding nobody needs is trimmed
    assert order == [2, 1]  # the last row fills the hole: one row copied, not the batch
    live[:] = [live[i] for i in order]
    step()
    join(3)  # much longer: the buffers grow on the left
    for _ in range(6):  # and on the right, past the first allocation
        step()
    order = batch.remove([0, 2])
    live[:] = [live[i] for i in order]
    step()
    assert len(batch) == 1
    assert (getattr(model, "_llmslim_lean", None) is not None) == arch.endswith("-lean")


def test_a_single_row_takes_the_lean_path_with_the_same_logits():
    model = accelerate(make_tiny_model("llama").eval(), torch.float32)
    prompt = [5, 9, 17, 3, 8]
    want = alone(model, prompt, 6)  # transformers' own forward on the same modules
    batch = PaddedBatch(model)
    cache, _ = prefill(model, prompt, all_logits=False)
    batch.add(cache, len(prompt))
    for k in range(6):
        got = batch.step([int(want[k].argmax())])
        torch.testing.assert_close(got[0], want[k + 1], rtol=1e-4, atol=1e-4)
    assert getattr(model, "_llmslim_lean", None) is not None  # the lean forward was used

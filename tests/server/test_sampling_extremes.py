"""Sampling never crashes the engine on extreme but valid parameters (found by schemathesis)."""

import torch

from llmslim.server.sampling import SamplingParams, sample


def test_tiny_temperature_and_all_banned_degenerate_to_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert sample(logits, SamplingParams(temperature=1e-45), g) == 1
    assert sample(logits, SamplingParams(temperature=1e-30, top_p=0.5), g) == 1
    banned = torch.full((3,), float("-inf"))
    assert sample(banned, SamplingParams(temperature=0.7), g) in (0, 1, 2)

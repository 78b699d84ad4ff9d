"""The fixed prompts of the logits comparisons (imported from both venvs; pure Python)."""

PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that changed physics. The first",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, a little fox lived at the edge of a quiet forest. Every morning she would "
    "walk down to the river, look at her reflection and wonder where the water went after it "
    "passed the old stone bridge. One day she decided to follow it.",
]

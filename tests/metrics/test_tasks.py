"""Multiple-choice scoring: lm-eval's pair encoding, a rigged model with a known answer, task loading."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.errors import UserError
from llmslim.metrics import Doc, evaluate_docs, evaluate_task, loglikelihoods
from llmslim.metrics.mc import encode_pair
from llmslim.metrics.ppl import encode
from llmslim.metrics.tasks import bigbench_docs, bigbench_prompt, get_task, parse_tasks

from .conftest import Rigged


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "The dog is ", "lazy")
    assert ctx == encode(tiny_tokenizer, "The dog is", add_special_tokens=True)
    assert ctx + cont == encode(tiny_tokenizer, "The dog is lazy", add_special_tokens=True)


def test_encode_pair_empty_context_uses_the_prefix_token(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "", " lazy dog")
    assert ctx == [tiny_tokenizer.bos_token_id] and cont == encode(tiny_tokenizer, " lazy dog")


def test_loglikelihood_equals_hand_computation(model, tiny_tokenizer):
    pairs = [("The quick brown", " fox jumps"), ("Once upon a", " time"), ("", " park")]
    got = loglikelihoods(model, tiny_tokenizer, pairs, progress=False)
    for (context, continuation), (ll, _) in zip(pairs, got, strict=True):
        ctx, cont = encode_pair(tiny_tokenizer, context, continuation)
        ids = ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        want = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
        assert ll == pytest.approx(want, rel=1e-5)


def test_padding_in_batches_does_not_change_loglikelihoods(model, tiny_tokenizer):
    pairs = [("The quick brown fox jumps over the", " lazy dog"), ("Lily", " liked"), ("A", " b c d e f g")]
    one = loglikelihoods(model, tiny_tokenizer, pairs, token_budget=1, progress=False)
    batched = loglikelihoods(model, tiny_tokenizer, pairs, token_budget=4096, progress=False)
    for (a, ga), (b, gb) in zip(one, batched, strict=True):
        assert a == pytest.approx(b, rel=1e-5) and ga == gb


def rigged_for(tokenizer, answer: str) -> Rigged:
    return Rigged(len(tokenizer), encode(tokenizer, " " + answer))


def test_known_answer_with_a_rigged_model(tiny_tokenizer):
    model = rigged_for(tiny_tokenizer, "yes")
    docs = [
        Doc(("Q: is it?\nA:",) * 2, (" yes", " no"), (0,), (3, 2)),  # right answer is the certain one
        Doc(("Q: is it not?\nA:",) * 2, (" yes", " no"), (1,), (3, 2)),  # right answer is the impossible one
    ]
    r = evaluate_docs(model, tiny_tokenizer, docs, progress=False)
    assert r["n"] == 2 and r["acc"] == 0.5 and r["acc_norm"] == 0.5
    assert r["acc_stderr"] == pytest.approx(0.5)  # sample std of [1, 0] is sqrt(0.5); / sqrt(2)
    assert r["chance"] == 0.5


def test_acc_norm_divides_by_characters(tiny_tokenizer):
    # A uniform model: log-likelihood is proportional to the token count; per character the
    # longer choice can win while the raw sum picks the shorter one.
    model = Rigged(len(tiny_tokenizer), list(range(len(tiny_tokenizer))))
    short, long = "a", "the lazy dog jumps"
    n_short, n_long = (len(encode(tiny_tokenizer, " " + c)) for c in (short, long))
    doc = Doc(("Q:",) * 2, (" " + short, " " + long), (1,), (len(short), len(long)))
    r = evaluate_docs(model, tiny_tokenizer, [doc], progress=False)
    assert r["acc"] == 0.0  # fewer tokens, higher likelihood
    assert r["acc_norm"] == float(n_long / len(long) < n_short / len(short))
    assert r["acc_stderr"] is None  # one example: no sample standard deviation


def test_multiple_gold_answers_and_ties(tiny_tokenizer):
    model = rigged_for(tiny_tokenizer, "yes")
    doc = Doc(("Q:",) * 3, (" no", " yes", " yes"), (2,), (2, 3, 3))
    assert evaluate_docs(model, tiny_tokenizer, [doc], progress=False)["acc"] == 0.0  # first of a tie wins
    doc = Doc(("Q:",) * 3, (" no", " yes", " yes"), (1, 2), (2, 3, 3))
    r = evaluate_docs(model, tiny_tokenizer, [doc], progress=False)
    assert r["acc"] == 1.0 and r["chance"] == pytest.approx(2 / 3)


def test_last_word_accuracy(tiny_tokenizer):
    model = rigged_for(tiny_tokenizer, "the")  # " the" is one token: the model's greedy choice
    docs = [Doc(("it is",), (" the",), (0,), None), Doc(("it is",), (" no",), (0,), None)]
    r = evaluate_docs(model, tiny_tokenizer, docs, kind="last_word", progress=False)
    assert r["acc"] == 0.5 and "acc_norm" not in r and math.isfinite(r["perplexity"])


def test_bigbench_prompt_uses_its_defaults():
    example = {"input": "2 + 2 =", "target_scores": {"5": 0, "4": 1}}
    assert bigbench_prompt({}, example) == "Q: 2 + 2 =\n  choice: 4\n  choice: 5\nA:"
    meta = {"task_prefix": "Math.\n", "append_choices_to_input": False, "example_output_prefix": "\nThe answer is "}
    assert bigbench_prompt(meta, example) == "Math.\n\nQ: 2 + 2 =\nThe answer is"
    doc = bigbench_docs({"examples": [example]})[0]
    assert doc.continuations == (" 5", " 4") and doc.gold == (1,) and doc.norm_lengths == (1, 1)


def test_bigbench_task_runs_offline_with_limit(model, tiny_tokenizer):
    r = evaluate_task(model, tiny_tokenizer, "general_knowledge", limit=3, progress=False)
    assert r["n"] == 3 and r["limit"] == 3 and 0 <= r["acc"] <= 1 and 0 < r["chance"] < 1
    assert "BIG-bench" in r["source"] and "acc_norm" in r


def test_every_shipped_task_loads():
    for name in ("goal_step_wikihow_goal_inference", "winowhy", "strategyqa", "causal_judgment"):
        docs = get_task(name).load(5)
        assert len(docs) == 5 and all(d.gold and len(d.contexts) >= 2 for d in docs)


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(UserError, match="unknown task 'nope'.*goal_step_wikihow_goal_inference.*hellaswag"):
        parse_tasks("winowhy,nope")
    with pytest.raises(UserError, match="unknown task"):
        get_task("nope")
    with pytest.raises(UserError, match="at least one"):
        parse_tasks(" , ")


def test_bad_limit(model, tiny_tokenizer):
    with pytest.raises(UserError, match="--limit"):
        evaluate_task(model, tiny_tokenizer, "winowhy", limit=0, progress=False)


def test_hub_task_without_the_hub_is_a_user_error(monkeypatch, model, tiny_tokenizer):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="allenai/ai2_arc.*needs the hub"):
        evaluate_task(model, tiny_tokenizer, "arc_easy", limit=2, progress=False)


def test_hub_task_formulations_from_rows(monkeypatch, model, tiny_tokenizer):
    """The lm-eval formulations, fed rows shaped like the hub datasets (no download)."""
    import datasets

    rows = {
        "allenai/ai2_arc": [{"question": "Which is hot?", "choices": {"text": ["ice", "fire"], "label": ["A", "B"]},
                             "answerKey": "B"}],
        "baber/piqa": [{"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}],
        "allenai/winogrande": [{"sentence": "The cup broke because _ was fragile.", "option1": "the cup",
                                "option2": "the table", "answer": "1"}],
        "EleutherAI/lambada_openai": [{"text": "she opened the door and saw her dog"}],
        "Rowan/hellaswag": [{"activity_label": "Cooking", "ctx_a": "He cuts onions.", "ctx_b": "then he",
                             "endings": ["fries them [title] well", "sleeps"], "label": "0"}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: datasets.Dataset.from_list(rows[path]))
    arc = get_task("arc_easy").load(None)[0]
    assert arc.contexts[0] == "Question: Which is hot?\nAnswer:" and arc.continuations == (" ice", " fire")
    assert arc.gold == (1,)
    wino = get_task("winogrande").load(None)[0]
    assert wino.contexts == ("The cup broke because the cup", "The cup broke because the table")
    assert wino.continuations == (" was fragile.",) * 2 and wino.norm_lengths is None
    lam = get_task("lambada").load(None)[0]
    assert lam.contexts == ("she opened the door and saw her",) and lam.continuations == (" dog",)
    hs = get_task("hellaswag").load(None)[0]
    assert hs.contexts[0] == "Cooking: He cuts onions. Then he" and hs.continuations[0] == " fries them. well"
    for name in ("arc_challenge", "piqa", "winogrande", "lambada", "hellaswag"):
        r = evaluate_task(model, tiny_tokenizer, name, progress=False)
        assert r["n"] == 1 and 0 <= r["acc"] <= 1

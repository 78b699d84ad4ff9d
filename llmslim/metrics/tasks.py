"""Zero-shot task definitions: offline BIG-bench JSON tasks and lm-eval's hub tasks.

Every task becomes a list of ``Doc``\\ s: what to score (context/continuation pairs) and which
choice is right. Scoring lives in ``mc.py``; this file only says what the prompts are, so it
reads as a list of formulations that can be checked against lm-eval's task YAMLs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from ..errors import UserError

HUB_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada")


@dataclass(frozen=True)
class Doc:
    """One question: score each ``contexts[i] + continuations[i]``; ``gold`` are the right indices.

    ``norm_lengths`` are the character lengths lm-eval divides by for ``acc_norm`` (the choice
    text without its leading space); ``None`` where lm-eval reports no acc_norm.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: tuple[int, ...]
    norm_lengths: tuple[int, ...] | None


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" (acc, acc_norm) or "last_word" (lambada: greedy accuracy)
    source: str
    formulation: str
    load: Callable[[int | None], list[Doc]]


def available_tasks() -> list[str]:
    return sorted(bigbench_names()) + list(HUB_TASKS)


def get_task(name: str) -> Task:
    if name in bigbench_names():
        return bigbench_task(name)
    if name in HUB_TASKS:
        return _HUB[name]()
    raise UserError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")


def parse_tasks(spec: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, every name checked before any model time is spent."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks needs at least one task name")
    for n in names:
        if n not in bigbench_names() and n not in HUB_TASKS:
            raise UserError(f"unknown task {n!r}; available: {', '.join(available_tasks())}")
    return names


def mc_doc(context: str, choices: list[str], gold: list[int]) -> Doc:
    """The standard lm-eval multiple choice: one context, continuations ``" " + choice``."""
    return Doc((context,) * len(choices), tuple(" " + c for c in choices), tuple(gold),
               tuple(len(c) for c in choices))


# ---- BIG-bench (offline, shipped in llmslim/tasks) ----------------------------------------

def bigbench_names() -> set[str]:
    folder = resources.files("llmslim") / "tasks"
    return {p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")}


def bigbench_task(name: str) -> Task:
    return Task(name, "multiple_choice", f"BIG-bench {name}.json (bigbench 1.0.0, Apache-2.0)",
                "BIG-bench JSON prompt (task_prefix + Q:/A: prefixes, choices listed when the task "
                "says so), stripped; continuation ' ' + choice; gold = max target_score",
                lambda limit: bigbench_docs(json.loads((resources.files("llmslim") / "tasks" / f"{name}.json")
                                                       .read_text(encoding="utf-8")), limit))


def bigbench_prompt(meta: dict, example: dict) -> str:
    """BIG-bench's ``default_format_fn`` zero-shot prompt, with its defaults.

    Two deliberate differences: listed choices are in sorted order (BIG-bench permutes the
    sorted list with a seeded RNG), and the prompt is stripped, because lm-eval's pair encoding
    would move a trailing space into every continuation anyway.
    """
    text = example["input"]
    if meta.get("append_choices_to_input", True):
        prefix = meta.get("choice_prefix", "\n  choice: ")
        text += prefix + prefix.join(sorted(example["target_scores"]))
    text = meta.get("task_prefix", "") + meta.get("example_input_prefix", "\nQ: ") + text
    return (text + meta.get("example_output_prefix", "\nA: ")).strip()


def bigbench_docs(meta: dict, limit: int | None = None) -> list[Doc]:
    docs = []
    for example in meta["examples"][:limit]:
        scores = example["target_scores"]
        best = max(scores.values())
        choices = list(scores)
        docs.append(mc_doc(bigbench_prompt(meta, example), choices,
                           [i for i, c in enumerate(choices) if scores[c] == best]))
    return docs


# ---- hub tasks: lm-eval 0.4.13's formulations, fetched lazily through `datasets` -------------

def load_hub(path: str, name: str | None, split: str, limit: int | None):
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # offline, missing, gated, ...: any failure here is the hub's, reported in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load {path} from the Hugging Face hub ({first}); this task needs the hub "
                        "- offline, use a BIG-bench task") from None
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)  # WikiHow artifacts
    return text.replace("  ", " ")


def _hellaswag(limit):
    docs = []
    for d in load_hub("Rowan/hellaswag", None, "validation", limit):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        docs.append(mc_doc(_hellaswag_clean(d["activity_label"] + ": " + ctx),
                           [_hellaswag_clean(e) for e in d["endings"]], [int(d["label"])]))
    return docs


def _arc(subset: str):
    def load(limit):
        return [mc_doc(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
                       [d["choices"]["label"].index(d["answerKey"])])
                for d in load_hub("allenai/ai2_arc", subset, "test", limit)]
    return load


def _piqa(limit):
    return [mc_doc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], [int(d["label"])])
            for d in load_hub("baber/piqa", None, "validation", limit)]


def _winogrande(limit):
    # Partial evaluation: the choice fills the blank in the context, the rest of the sentence is
    # the shared continuation; lm-eval reports only acc for it.
    docs = []
    for d in load_hub("allenai/winogrande", "winogrande_xl", "validation", limit):
        i = d["sentence"].index("_")
        contexts = tuple(d["sentence"][:i] + opt for opt in (d["option1"], d["option2"]))
        rest = " " + d["sentence"][i + 1:].strip()
        docs.append(Doc(contexts, (rest, rest), ({"1": 0, "2": 1}[d["answer"]],), None))
    return docs


def _lambada(limit):
    docs = []
    for d in load_hub("EleutherAI/lambada_openai", "default", "test", limit):
        words = d["text"].split(" ")
        docs.append(Doc((" ".join(words[:-1]),), (" " + words[-1],), (0,), None))
    return docs


_HUB = {
    "hellaswag": lambda: Task("hellaswag", "multiple_choice", "hub Rowan/hellaswag validation",
                              "lm-eval hellaswag: '<activity>: <ctx>' -> ' <ending>'", _hellaswag),
    "arc_easy": lambda: Task("arc_easy", "multiple_choice", "hub allenai/ai2_arc ARC-Easy test",
                             "lm-eval arc_easy: 'Question: q\\nAnswer:' -> ' choice'", _arc("ARC-Easy")),
    "arc_challenge": lambda: Task("arc_challenge", "multiple_choice", "hub allenai/ai2_arc ARC-Challenge test",
                                  "lm-eval arc_challenge: 'Question: q\\nAnswer:' -> ' choice'",
                                  _arc("ARC-Challenge")),
    "piqa": lambda: Task("piqa", "multiple_choice", "hub baber/piqa validation",
                         "lm-eval piqa: 'Question: goal\\nAnswer:' -> ' solution'", _piqa),
    "winogrande": lambda: Task("winogrande", "multiple_choice", "hub allenai/winogrande winogrande_xl validation",
                               "lm-eval winogrande: partial scoring of the sentence after the blank", _winogrande),
    "lambada": lambda: Task("lambada", "last_word", "hub EleutherAI/lambada_openai test",
                            "lm-eval lambada_openai: last word greedy accuracy and perplexity", _lambada),
}

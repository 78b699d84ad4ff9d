"""One stop-string matcher: ``generate`` and the server engine cut the text at the same place,
including a stop string that spans a token boundary."""

from __future__ import annotations

import queue

import llmslim.runtime.generate as gen
import llmslim.server.engine as eng
from llmslim.runtime.generate import generate
from llmslim.runtime.sampling import SamplingParams
from llmslim.runtime.stops import StopStrings
from llmslim.server.engine import Done, Engine, Failed, Output
from tests.conftest import make_tiny_model, make_tiny_tokenizer

PROMPT = "Once upon a time there was a little girl"


def test_generate_and_the_server_use_the_same_matcher():
    assert gen.StopStrings is eng.StopStrings is StopStrings


def test_holds_back_what_could_start_a_stop_string():
    s = StopStrings(["END", ""])
    assert s.find("abc EN", 0) == -1 and s.safe("abc EN") == 4
    assert s.find("abc ENDx", 6) == 4  # "END" began before the new text: still found
    assert s.find("abc ENDx END", 11) == 9  # the earlier one ended before new_from - hold
    assert StopStrings([]).find("END", 0) == -1 and StopStrings([]).safe("abc") == 3


def server_text(model, tok, prompt: list[int], **kw) -> tuple[str, list[int], str]:
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        q: queue.Queue = queue.Queue()
        engine.submit(prompt, SamplingParams(**kw), q.put)
        text, tokens, reason = "", [], None
        while True:
            event = q.get(timeout=60)
            assert not isinstance(event, Failed), event.message
            if isinstance(event, Done):
                return text, tokens, reason
            if isinstance(event, Output):
                text, tokens, reason = text + event.text, tokens + event.token_ids, event.finish_reason
    finally:
        engine.stop()


def test_a_stop_string_spanning_two_tokens_cuts_both_loops_alike():
    model, tok = make_tiny_model("llama").eval(), make_tiny_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    free = generate(model, tok, ids, max_new_tokens=24, ignore_eos=True)
    # a stop string made of the last character of one token and the first of the next
    ends = [len(tok.decode(free.tokens[:k + 1])) for k in range(len(free.tokens))]
    k = next(k for k in range(2, len(ends) - 1) if ends[k - 1] < ends[k] < ends[k + 1])
    stop = free.text[ends[k] - 1:ends[k] + 1]
    want = free.text[:free.text.find(stop)]

    r = generate(model, tok, ids, max_new_tokens=24, stop=stop, ignore_eos=True)
    assert (r.text, r.finish_reason) == (want, "stop")
    text, tokens, reason = server_text(model, tok, ids, max_tokens=24, temperature=0, stop=[stop], ignore_eos=True)
    assert (text, reason) == (want, "stop")
    assert tokens == r.tokens

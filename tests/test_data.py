"""llmslim.data: built-in corpora, hub conventions (with a fake hub), local files, calibration windows."""

from __future__ import annotations

import html
import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

from llmslim import corpora
from llmslim.data import BUILTIN, HUB, calibration_tokens, eval_text, load_documents
from llmslim.errors import UserError


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def gptq_windows(ids: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's wikitext2 sampler (datautils.get_wikitext2), with a private RNG."""
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts])


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in content) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return str(path)


# --- built-in corpora -----------------------------------------------------------------------------


def test_builtin_names():
    assert list(BUILTIN) == ["wiki", "web", "stories", "technical", "code"]
    for name in BUILTIN:
        assert corpora.read_text(name)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_split_is_80_20_by_document_without_overlap(name):
    docs = corpora.documents(name)
    calib, ev = load_documents(name, "calib"), load_documents(name, "eval")
    assert calib + ev == list(docs)
    assert len(calib) == len(docs) * 4 // 5 and ev
    assert not set(ev) & set(calib)
    joined = "\n\n".join(calib)
    assert not [d for d in ev if d in joined], "an eval document appears inside the calibration text"
    assert eval_text(name) == "\n\n".join(ev)


def test_wiki_split_follows_articles():
    raw = corpora.read_text("wiki")
    titles = [html.unescape(t) for t in re.findall(r'<doc [^>]*title="([^"]*)">', raw)]
    assert len(titles) == raw.count("</doc>") == 2349
    calib, ev = load_documents("wiki", "calib"), load_documents("wiki", "eval")
    assert (len(calib), len(ev)) == (1879, 470)
    # Each document is one article, title line first, in file order.
    assert [d.split("\n")[0] for d in calib + ev] == titles
    text = eval_text("wiki")
    assert "<doc" not in text and "</doc>" not in text and "&amp;" not in text


def test_builtin_markup_is_not_text():
    assert not any("<|endoftext|>" in d for d in corpora.documents("stories"))
    assert all("\n" not in d for d in corpora.documents("web"))


# --- calibration windows --------------------------------------------------------------------------


def test_shape_dtype_and_gptq_windows(tiny_tokenizer):
    x = calibration_tokens("technical", tiny_tokenizer, nsamples=6, seqlen=48, seed=3)
    assert x.shape == (6, 48) and x.dtype == torch.long
    ids = ids_of(tiny_tokenizer, "\n\n".join(load_documents("technical", "calib")))
    assert torch.equal(x, gptq_windows(ids, 6, 48, seed=3))


def test_deterministic_and_leaves_global_rng_alone(tiny_tokenizer):
    state, torch_state = random.getstate(), torch.get_rng_state()
    a = calibration_tokens("stories", tiny_tokenizer, nsamples=4, seqlen=32, seed=0)
    random.seed(12345)  # the global state must not matter
    b = calibration_tokens("stories", tiny_tokenizer, nsamples=4, seqlen=32, seed=0)
    c = calibration_tokens("stories", tiny_tokenizer, nsamples=4, seqlen=32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    random.seed(0)
    random.setstate(state)
    calibration_tokens("stories", tiny_tokenizer, nsamples=2, seqlen=16)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)


def test_max_len_caps_seqlen(tiny_tokenizer):
    assert calibration_tokens("code", tiny_tokenizer, nsamples=2, seqlen=64, max_len=16).shape == (2, 16)
    assert calibration_tokens("code", tiny_tokenizer, nsamples=2, seqlen=8, max_len=16).shape == (2, 8)


def test_too_short_says_how_many_tokens(tiny_tokenizer, tmp_path):
    path = write(tmp_path, "short.txt", "just a few words")
    n = len(ids_of(tiny_tokenizer, "just a few words"))
    with pytest.raises(UserError, match=rf"has {n} tokens .* needs at least 101.*smaller --seqlen"):
        calibration_tokens(path, tiny_tokenizer, nsamples=1, seqlen=100)
    # Exactly seqlen + 1 tokens is enough.
    assert calibration_tokens(path, tiny_tokenizer, nsamples=3, seqlen=n - 1).shape == (3, n - 1)


# --- local files ----------------------------------------------------------------------------------


def test_txt_file(tmp_path, tiny_tokenizer):
    content = "First paragraph.\nStill first.\n\n\nSecond one.\r\n\r\n  Third  \n"
    path = write(tmp_path, "notes.txt", content.encode())
    assert load_documents(path, "calib") == ["First paragraph.\nStill first.", "Second one.", "Third"]
    assert load_documents(path, "eval") == [content]
    assert eval_text(path) == content  # whole and unmodified, \r\n included
    x = calibration_tokens(path, tiny_tokenizer, nsamples=2, seqlen=4)
    expected = ids_of(tiny_tokenizer, "First paragraph.\nStill first.\n\nSecond one.\n\nThird")
    assert torch.equal(x, gptq_windows(expected, 2, 4, seed=0))


def test_jsonl_json_and_parquet_files(tmp_path):
    records = [{"id": 1, "content": "alpha beta"}, {"id": 2, "content": "gamma"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n", encoding="utf-8")
    for path in (str(jsonl), write(tmp_path, "list.json", records), write(tmp_path, "wrapped.json", {"data": records})):
        assert load_documents(path, "calib", text_field="content") == ["alpha beta", "gamma"]
        assert load_documents(path, "eval", text_field="content") == ["alpha beta", "gamma"]
        assert eval_text(path, text_field="content") == "alpha beta\n\ngamma"
    assert load_documents(write(tmp_path, "strings.json", ["x", "y"]), "calib") == ["x", "y"]

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet"), "calib", text_field="content") == ["alpha beta", "gamma"]


def test_chat_records_render_with_the_chat_template(tmp_path, tiny_tokenizer):
    chats = [
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]},
    ]
    path = write(tmp_path, "chat.jsonl", chats)
    docs = load_documents(path, "calib")
    assert docs == [c["messages"] for c in chats]  # raw, for the caller's template

    rendered = [tiny_tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in chats]
    assert rendered[0].startswith("<|im_start|>user\nhi there<|im_end|>")
    ids = ids_of(tiny_tokenizer, "\n\n".join(rendered))
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 4  # special tokens, not text
    x = calibration_tokens(path, tiny_tokenizer, nsamples=3, seqlen=len(ids) - 1)
    assert torch.equal(x, gptq_windows(ids, 3, len(ids) - 1, seed=0))
    assert eval_text(path, tokenizer=tiny_tokenizer) == "\n\n".join(rendered)
    assert eval_text(path).startswith("user: hi there\nassistant: hello")

    tiny_tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(UserError, match="rejected a chat record .Conversation roles must alternate"):
        calibration_tokens(path, tiny_tokenizer, nsamples=1, seqlen=4)
    tiny_tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        calibration_tokens(path, tiny_tokenizer, nsamples=1, seqlen=4)


def test_user_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"unknown data source 'wikki'.*wiki, web, stories, technical, code.*wikitext2"):
        load_documents("wikki", "calib")
    with pytest.raises(UserError, match="unknown data source"):
        load_documents(str(tmp_path / "missing.jsonl"), "calib")
    with pytest.raises(UserError, match=r"unsupported file type '\.csv'"):
        load_documents(write(tmp_path, "d.csv", "a,b\n"), "calib")
    with pytest.raises(UserError, match="directory"):
        load_documents(str(tmp_path), "calib")

    path = write(tmp_path, "d.jsonl", [{"id": 1, "content": "x"}])
    with pytest.raises(UserError, match=r"line 1 has no field 'text' \(fields: id, content\).*--text-field"):
        load_documents(path, "calib")
    with pytest.raises(UserError, match=r"field 'id' is int, not text"):
        load_documents(path, "calib", text_field="id")
    with pytest.raises(UserError, match=r"line 2 is not valid JSON"):
        load_documents(write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"text": \n'), "calib")
    with pytest.raises(UserError, match="JSON list of records"):
        load_documents(write(tmp_path, "obj.json", {"rows": []}), "calib")
    with pytest.raises(UserError, match="no records"):
        load_documents(write(tmp_path, "empty.jsonl", ""), "calib")
    with pytest.raises(UserError, match="role"):
        load_documents(write(tmp_path, "badchat.jsonl", [{"messages": [{"text": "hi"}]}]), "calib")
    with pytest.raises(UserError, match="not UTF-8"):
        load_documents(write(tmp_path, "latin1.txt", "café".encode("latin-1")), "eval")
    with pytest.raises(ValueError):
        load_documents("wiki", "train")


# --- hub datasets (never the real hub) ------------------------------------------------------------

WIKITEXT_TEST = ["", " = Valkyria Chronicles = \n", "", " Senjō no Valkyria is a game . \n"]
PTB_TEST = ["no it was n't black monday", "but while the new york stock exchange did n't fall"]


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering from small in-memory tables; ``.calls`` records every call."""
    import datasets

    long_docs = [" ".join(f"w{i}x{j}" for j in range(80)) for i in range(3)]
    tables = {
        ("Salesforce/wikitext", "train"): {"text": ["train line one\n", "", "train line two\n"] * 20},
        ("Salesforce/wikitext", "test"): {"text": WIKITEXT_TEST},
        ("allenai/c4", "train"): {"text": ["tiny"] * 20 + long_docs},
        ("allenai/c4", "validation"): {"text": [f"doc{i}" for i in range(1200)]},
        ("ptb-text-only/ptb_text_only", "train"): {"sentence": PTB_TEST * 10},
        ("ptb-text-only/ptb_text_only", "test"): {"sentence": PTB_TEST},
    }
    calls = []

    def load_dataset(path, name=None, *, split, data_files=None, revision=None):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files, "revision": revision})
        if path.startswith("ptb") and revision is None:  # the repo is a loading script
            raise RuntimeError("Dataset scripts are no longer supported, but found ptb_text_only.py")
        return datasets.Dataset.from_dict(tables[path, split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return SimpleNamespace(calls=calls, long_docs=long_docs)


def test_hub_eval_conventions_match_gptq(fake_hub):
    assert HUB == ("wikitext2", "c4", "ptb")
    assert eval_text("wikitext2") == "\n\n".join(WIKITEXT_TEST)
    assert fake_hub.calls[-1] == {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test",
                            "data_files": None, "revision": None}
    assert eval_text("c4") == " ".join(f"doc{i}" for i in range(1100))
    assert fake_hub.calls[-1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert eval_text("ptb") == " ".join(PTB_TEST)
    assert fake_hub.calls[-1]["revision"] == "refs/convert/parquet" and fake_hub.calls[-2]["name"] == "penn_treebank"
    assert load_documents("wikitext2", "calib")[:3] == ["train line one\n", "", "train line two\n"]


def test_hub_calibration(fake_hub, tiny_tokenizer):
    x = calibration_tokens("wikitext2", tiny_tokenizer, nsamples=4, seqlen=16, seed=2)
    ids = ids_of(tiny_tokenizer, "\n\n".join(["train line one\n", "", "train line two\n"] * 20))
    assert torch.equal(x, gptq_windows(ids, 4, 16, seed=2))
    assert calibration_tokens("ptb", tiny_tokenizer, nsamples=2, seqlen=8).shape == (2, 8)


def test_hub_c4_windows_lie_inside_one_long_document(fake_hub, tiny_tokenizer):
    x = calibration_tokens("c4", tiny_tokenizer, nsamples=5, seqlen=32, seed=0)
    assert fake_hub.calls[-1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    docs = [ids_of(tiny_tokenizer, d) for d in fake_hub.long_docs]
    for row in x.tolist():
        assert any(any(d[s : s + 32] == row for s in range(len(d) - 31)) for d in docs)
    assert torch.equal(x, calibration_tokens("c4", tiny_tokenizer, nsamples=5, seqlen=32, seed=0))
    # No document longer than seqlen: fall back to windows over the joined text.
    longest = max(len(d) for d in docs)
    assert calibration_tokens("c4", tiny_tokenizer, nsamples=2, seqlen=longest + 5).shape == (2, longest + 5)


@pytest.mark.parametrize("name", HUB)
def test_unreachable_hub_is_a_user_error(name, monkeypatch, tiny_tokenizer):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{args[0]}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    pattern = rf"'{name}'.*hub was unreachable.*built-in corpora work instead: wiki, web, stories"
    with pytest.raises(UserError, match=pattern):
        calibration_tokens(name, tiny_tokenizer, nsamples=1, seqlen=8)
    with pytest.raises(UserError, match=pattern) as err:
        eval_text(name)
    assert "\n" not in str(err.value)  # the CLI prints it as one line

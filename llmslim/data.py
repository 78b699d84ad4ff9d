"""Calibration tokens and held-out evaluation text, from three kinds of source.

A source (the ``--calib`` / ``--dataset`` value) is one of:

- a built-in corpus (``BUILTIN``): real text shipped in the package, works offline. Split by
  document: the first 80% calibrate, the last 20% evaluate, never overlapping.
- a hub dataset (``HUB``): loaded lazily through ``datasets`` with the configs and joins of the
  GPTQ reference code (IST-DASLab/gptq ``datautils.py``), so numbers compare with papers.
- a path to a ``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file: the user chose it, so it is
  used whole for both parts.

A document is a string, or a chat record's ``messages`` list, which stays raw until the
tokenizer's chat template renders it. Built-in names win over a file of the same name; write
``./wiki`` for the file.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .corpora import BUILTIN
from .corpora import part as _builtin_part
from .errors import UserError

__all__ = ["BUILTIN", "HUB", "Document", "load_documents", "calibration_tokens", "eval_text"]

Messages = list[dict[str, str]]
Document = str | Messages
PARTS = ("calib", "eval")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class _Hub:
    path: str
    name: str | None
    field: str
    splits: dict[str, str]  # part -> split
    data_files: dict[str, str] = field(default_factory=dict)  # part -> file in the repo (c4 shards)
    calib_join: str = "\n\n"
    eval_join: str = "\n\n"
    eval_docs: int | None = None
    parquet_export: bool = False


_HUB: dict[str, _Hub] = {
    # GPTQ loads "wikitext"; the hub now redirects that legacy name to Salesforce/wikitext.
    "wikitext2": _Hub("Salesforce/wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}),
    # GPTQ's "c4-new" convention (the one later papers report): one train shard for calibration;
    # eval is the first 1100 validation documents joined with " " (GPTQ then keeps 256 windows).
    "c4": _Hub(
        "allenai/c4",
        None,
        "text",
        {"calib": "train", "eval": "validation"},
        data_files={"calib": "en/c4-train.00000-of-01024.json.gz", "eval": "en/c4-validation.00000-of-00008.json.gz"},
        eval_join=" ",
        eval_docs=1100,
    ),
    # GPTQ's "ptb-new": train / test sentences joined with " ". The repo (the redirect target of
    # "ptb_text_only") is a loading script, which datasets>=4 refuses; its parquet export is the same data.
    "ptb": _Hub(
        "ptb-text-only/ptb_text_only",
        "penn_treebank",
        "sentence",
        {"calib": "train", "eval": "test"},
        calib_join=" ",
        eval_join=" ",
        parquet_export=True,
    ),
}
HUB: tuple[str, ...] = tuple(_HUB)

_VALID = (
    f"a built-in corpus ({', '.join(BUILTIN)}; offline), a hub dataset ({', '.join(HUB)}) "
    f"or a path to a {'/'.join(LOCAL_SUFFIXES)} file"
)


def load_documents(source: str, part: str, text_field: str = "text") -> list[Document]:
    """The documents of ``source`` for ``part`` ("calib" or "eval"), in order.

    Built-ins: first 80% / last 20% of documents. Hub: train / test (c4: validation, first 1100).
    Local files: every record for both parts; a .txt file is one document for "eval" and its
    blank-line paragraphs for "calib". Chat records come back as their raw ``messages`` list.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if source in BUILTIN:
        return _builtin_part(source, part)
    if source in _HUB:
        return list(_hub_texts(source, part))
    path = _local_path(source)
    if path.suffix.lower() == ".txt":
        text = _read(path)
        return [text] if part == "eval" else [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return _local_documents(path, text_field)


def calibration_tokens(
    source: str,
    tokenizer: Any,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    text_field: str = "text",
    max_len: int | None = None,
) -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` token ids ([nsamples, seqlen], int64), the same for the same args.

    GPTQ's method: join the calibration documents, tokenize once (no special tokens), take windows
    at random starts. Hub c4 keeps GPTQ's c4 method instead: each window lies inside one random
    document longer than ``seqlen``. ``max_len`` (the model context) caps ``seqlen``.
    """
    if nsamples <= 0:
        raise UserError(f"--nsamples must be positive, got {nsamples}")
    if max_len is not None:
        seqlen = min(seqlen, max_len)
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    # A private generator: the windows depend on the seed only, and callers' global RNG is untouched.
    rng = random.Random(seed)
    if source == "c4":
        windows = _per_document_windows(_hub_texts("c4", "calib"), tokenizer, nsamples, seqlen, rng)
        if windows is not None:
            return windows
    join = _HUB[source].calib_join if source in _HUB else "\n\n"
    docs = load_documents(source, "calib", text_field)
    ids = _encode(tokenizer, join.join(_render(d, tokenizer) for d in docs))
    n = ids.numel()
    if n < seqlen + 1:
        raise UserError(
            f"calibration data '{source}' has {n} tokens but --seqlen {seqlen} needs at least {seqlen + 1}; "
            f"use a smaller --seqlen or more data"
        )
    # randint(0, n - seqlen - 1) is GPTQ's range: with the same token stream and seed the windows
    # are the same as GPTQ's (random.seed(s); random.randint draws the sequence Random(s) does).
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_text(source: str, text_field: str = "text", tokenizer: Any = None) -> str:
    """Held-out text for perplexity.

    Built-ins: the eval documents joined with "\\n\\n". wikitext2: GPTQ's ``"\\n\\n".join(test["text"])``.
    c4: the first 1100 validation documents joined with " " (GPTQ then scores 256 windows of
    seqlen). ptb: ``" ".join(test["sentence"])``. A .txt file: its text, unmodified; other local
    files: their records joined with "\\n\\n", chat records rendered with ``tokenizer``'s template
    (as "role: content" lines when no tokenizer is given).
    """
    if source in _HUB:
        return _HUB[source].eval_join.join(_hub_texts(source, "eval"))
    if source in BUILTIN:
        return "\n\n".join(_builtin_part(source, "eval"))
    path = _local_path(source)
    if path.suffix.lower() == ".txt":
        return _read(path)
    return "\n\n".join(_render(d, tokenizer) for d in _local_documents(path, text_field))


# --- tokens ---------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    # verbose=False: the "longer than the model's maximum length" warning does not apply, the
    # stream is cut into windows afterwards.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _render(doc: Document, tokenizer: Any) -> str:
    if isinstance(doc, str):
        return doc
    if tokenizer is None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in doc)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the data has chat records (messages) but the tokenizer has no chat template; use plain text records"
        )
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(doc, tokenize=False)
    except (TemplateError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"the tokenizer's chat template rejected a chat record ({reason}); fix its messages") from e


def _per_document_windows(
    docs: Sequence[str], tokenizer: Any, nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor | None:
    """One random window inside a random document longer than ``seqlen`` per sample (GPTQ's c4 method).

    GPTQ redraws documents until one is long enough, which never ends when none is. Walking a
    random permutation also picks uniformly random long documents, without repeats while there
    are enough, and ends after one pass: then the long ones found are reused, or None if none is.
    """
    order = list(range(len(docs)))
    rng.shuffle(order)
    scanned = 0
    found: list[torch.Tensor] = []
    windows = []
    for k in range(nsamples):
        while len(found) <= k and scanned < len(order):
            ids = _encode(tokenizer, docs[order[scanned]])
            scanned += 1
            if ids.numel() > seqlen:
                found.append(ids)
        if not found:
            return None
        ids = found[k] if k < len(found) else rng.choice(found)
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


# --- hub ------------------------------------------------------------------------------------------


def _hub_texts(name: str, part: str) -> Sequence[str]:
    """The text column of hub dataset ``name`` for ``part``: indexable and lazy (c4 is 356K documents)."""
    spec = _HUB[name]
    split = spec.splits[part]
    kwargs: dict[str, Any] = {"split": split}
    if part in spec.data_files:
        kwargs["data_files"] = {split: spec.data_files[part]}
    try:
        ds = _load_hub(spec, kwargs)
    except Exception as e:  # any failure to fetch (offline, DNS, HTTP, missing repo) is the user's to fix
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"could not load hub dataset '{name}' ({spec.path}): the Hugging Face hub was unreachable or refused it "
            f"({type(e).__name__}: {reason}); offline built-in corpora work instead: {', '.join(BUILTIN)}"
        ) from e
    if part == "eval" and spec.eval_docs is not None:
        ds = ds.select(range(min(spec.eval_docs, len(ds))))
    return ds[spec.field]


def _load_hub(spec: _Hub, kwargs: dict[str, Any]) -> Any:
    import datasets  # imported here: it is slow to import and only hub sources need it

    try:
        return datasets.load_dataset(spec.path, spec.name, **kwargs)
    except RuntimeError as e:
        if not (spec.parquet_export and "scripts are no longer supported" in str(e)):
            raise
    # The hub's automatic parquet export of the script (branch refs/convert/parquet) needs no
    # script; its folders are named after the splits, so no config name is passed.
    return datasets.load_dataset(spec.path, revision="refs/convert/parquet", **kwargs)


# --- local files ----------------------------------------------------------------------------------


def _local_path(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"'{source}' is a directory; pass a {'/'.join(LOCAL_SUFFIXES)} file")
    if not path.is_file():
        raise UserError(f"unknown data source '{source}': use {_VALID}")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise UserError(f"'{source}': unsupported file type '{path.suffix}'; use a {'/'.join(LOCAL_SUFFIXES)} file")
    return path


def _read(path: Path) -> str:
    # Bytes, not read_text(): universal-newline translation would change the text being evaluated.
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8") from e


def _local_documents(path: Path, text_field: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records, where = _parquet_records(path), "row"
    elif suffix == ".jsonl":
        records, where = [], "line"
        for i, line in enumerate(_read(path).splitlines(), 1):
            if line.strip():
                records.append((i, _json(line, f"{path} line {i}")))
    else:
        data = _json(_read(path), str(path))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(
                f"{path}: expected a JSON list of records or {{\"data\": [...]}}; for one record per line use .jsonl"
            )
        records, where = list(enumerate(data, 1)), "record"
    if not records:
        raise UserError(f"{path} has no records; give a file with at least one")
    return [_document(rec, text_field, f"{path} {where} {i}") for i, rec in records]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file") from e


def _parquet_records(path: Path) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq  # installed with datasets

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path} is not a readable parquet file ({e}); check the file") from e
    return list(enumerate(rows, 1))


def _document(record: Any, text_field: str, where: str) -> Document:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UserError(f"{where} is a {type(record).__name__}; records must be objects with a '{text_field}' field")
    value = record.get(text_field)
    if value is None and text_field not in record and isinstance(record.get("messages"), list):
        value = record["messages"]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where)
    if text_field in record:
        kind = type(value).__name__
        raise UserError(f"{where}: field '{text_field}' is {kind}, not text; pick a text field with --text-field")
    fields = ", ".join(map(str, record)) or "none"
    raise UserError(f"{where} has no field '{text_field}' (fields: {fields}); pick one with --text-field")


def _messages(messages: list, where: str) -> Messages:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f"{where}: chat messages must be objects with string 'role' and 'content'; got {m!r:.80}")
    return messages

"""The built-in offline corpora: which file each name reads, how it is cut into documents, and the split.

The files are verbatim copies of real text (sources and licenses in ``LICENSES.md``). Each keeps
its original layout, so each needs its own document splitter. Documents are split, never
characters or tokens, so that a calibration window can never contain evaluation text: the first
80% of documents in file order are the calibration part, the last 20% the evaluation part.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from functools import cache
from importlib.resources import files

# name -> file inside this package (shipped as package data, see pyproject.toml).
BUILTIN: dict[str, str] = {
    "wiki": "wiki.txt",
    "web": "web.txt",
    "stories": "stories.txt",
    "technical": "technical.txt",
    "code": "code.txt",
}

# WikiExtractor output: <doc id=.. url=.. title=..>\nTitle\n\nBody...\n</doc>. The first line of the
# content is the title, so an article keeps it. 1,254 of the 2,349 articles are title-only (mostly
# redirect pages, which WikiExtractor writes without a body); they stay so that the split follows
# the file's own article count, and they are a few tokens each.
_WIKI_DOC = re.compile(r"<doc [^>]*>\n(.*?)</doc>", re.S)


def _wiki(text: str) -> list[str]:
    # WikiExtractor escapes &, <, > and " in the text (&amp; &lt; &gt; &quot;, the only entities
    # in the file); the model should see the characters.
    return [html.unescape(doc) for doc in _WIKI_DOC.findall(text)]


def _lines(text: str) -> list[str]:
    # The C4 sample is one web page per line.
    return text.split("\n")


def _endoftext(text: str) -> list[str]:
    # TinyStories marks the end of each story with <|endoftext|>; the marker is not story text.
    return text.split("<|endoftext|>")


def _paragraphs(text: str) -> list[str]:
    # The technical sample concatenates license texts and articles with no marker between them;
    # blank-line paragraphs are the only boundary it has.
    return re.split(r"\n[ \t]*\n", text)


def _snippets(text: str) -> list[str]:
    # Code keeps single blank lines inside functions; snippets are separated by two or more.
    return re.split(r"\n[ \t]*\n(?:[ \t]*\n)+", text)


_SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "wiki": _wiki,
    "web": _lines,
    "stories": _endoftext,
    "technical": _paragraphs,
    "code": _snippets,
}


def read_text(name: str) -> str:
    """The file of built-in corpus ``name``, exactly as shipped."""
    return files(__name__).joinpath(BUILTIN[name]).read_bytes().decode("utf-8")


@cache
def documents(name: str) -> tuple[str, ...]:
    """All documents of built-in corpus ``name`` in file order: stripped, no empties, no exact repeats.

    Repeats are dropped (first occurrence kept) because the C4 and code samples contain a few
    verbatim duplicates, and a duplicate on both sides of the split would leak eval text.
    """
    seen: set[str] = set()
    docs = []
    for doc in _SPLITTERS[name](read_text(name)):
        doc = doc.strip()
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return tuple(docs)


def split_point(n_docs: int) -> int:
    """Index of the first evaluation document: the first 80% (rounded down) calibrate."""
    return n_docs * 4 // 5  # integer arithmetic: int(n * 0.8) can round 0.8 * n down by one


def part(name: str, which: str) -> list[str]:
    """The ``"calib"`` (first 80%) or ``"eval"`` (last 20%) documents of built-in corpus ``name``."""
    docs = documents(name)
    k = split_point(len(docs))
    return list(docs[:k] if which == "calib" else docs[k:])

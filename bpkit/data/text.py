"""Character-level text: any UTF-8 file, or one of two corpora built from the Python standard
library (present offline on every machine with Python):

* ``python_source`` (the default): the top-level modules' source, first file first;
* ``python_docs``: English prose, the module/class/function docstrings of the modules that
  ``python_source`` at the same ``max_chars`` does not reach (so the two share no text), last
  module first. It is written in ``python_source``'s vocabulary (the distinct characters of
  that corpus; the rare others are dropped), so a model trained on one reads the other: the
  fine-tuning and forgetting study of docs/training.md moves between them.

The last 10% is held out for testing."""
from __future__ import annotations

import ast
import glob
import os
import sysconfig

import numpy as np

from bpkit.data.batching import DataError, Dataset
from bpkit.validate import report, text_problems


CORPORA = ("python_source", "python_docs")


def _stdlib_sources():
    """``(path, text)`` of the standard library's top-level modules, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")))
    if not paths:
        raise DataError(f"no Python source files found under {root}; set data.path to a text "
                        "file")
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yield path, f.read()
        except (UnicodeDecodeError, OSError):
            continue


def _split_sources(max_chars: int):
    """``(read, rest)``: the modules the source corpus of ``max_chars`` reads, and the others."""
    read, rest, total = [], [], 0
    for path, text in _stdlib_sources():
        (read if total < max_chars else rest).append(text)
        total += len(text)
    return read, rest


def default_corpus(max_chars: int = 2_000_000) -> str:
    """Python standard-library source files, sorted by name, concatenated up to ``max_chars``."""
    return "".join(_split_sources(max_chars)[0])[:max_chars]


def docs_corpus(max_chars: int = 2_000_000) -> str:
    """English prose: the docstrings (module, classes, functions; indentation cleaned by
    ``ast.get_docstring``) of the standard-library modules that ``default_corpus(max_chars)``
    does not reach, last module first, separated by blank lines, up to ``max_chars``."""
    parts, total = [], 0
    for source in reversed(_split_sources(max_chars)[1]):
        try:
            tree = ast.parse(source)
        except SyntaxError:  # a module of a newer grammar than this interpreter's
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc + "\n\n")
                    total += len(doc) + 2
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def encode(text: str, vocab: str) -> np.ndarray:
    table = {c: i for i, c in enumerate(vocab)}
    return np.array([table[c] for c in text], np.int32)


def decode(tokens, vocab: str) -> str:
    return "".join(vocab[int(t)] for t in tokens)


def load_text(path: str | None = None, context: int = 64, max_chars: int = 2_000_000,
              encoding: str | None = None, corpus: str = "python_source") -> Dataset:
    """Character tokens of ``path`` (or the built-in ``corpus``); vocab = sorted distinct chars
    (``python_docs``: those of ``python_source``, see the module docstring).

    The file must decode strictly as UTF-8, or as ``encoding`` when one is given; a binary
    file (NUL bytes) is refused rather than read as replacement characters."""
    if path:
        if not os.path.isfile(path):
            raise DataError(f"data.path: text file not found: {path}")
        with open(path, "rb") as f:
            raw = f.read(4 * max_chars)  # enough bytes for max_chars characters
            complete = not f.read(1)
        text, problems = text_problems(raw, path, encoding, complete=complete)
        if problems:
            raise DataError(report(problems))
        text = text[:max_chars]
        name = os.path.basename(path)
        vocab = "".join(sorted(set(text)))
    elif corpus == "python_docs":
        vocab = "".join(sorted(set(default_corpus(max_chars))))
        known = set(vocab)
        text, name = "".join(c for c in docs_corpus(max_chars) if c in known), "python-docs"
        if not text:
            raise DataError(f"data.corpus=python_docs: with data.max_chars={max_chars} the "
                            "source corpus reads every standard-library module, leaving no "
                            "docstrings for this one; lower data.max_chars")
    else:
        text, name = default_corpus(max_chars), "python-stdlib"
        vocab = "".join(sorted(set(text)))
    tokens = encode(text, vocab)
    split = int(len(tokens) * 0.9)
    if split < context + 2 or len(tokens) - split < context + 2:
        raise DataError(f"{name} has {len(tokens)} characters: too short for data.context="
                        f"{context}")
    return Dataset(name, "lm", tokens[:split], None, tokens[split:], None, vocab=vocab,
                   context=context)

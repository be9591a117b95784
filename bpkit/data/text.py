"""Character-level text: any UTF-8 file, or by default the Python standard library's own
source (present offline on every machine with Python). The last 10% is held out for testing."""
from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np

from bpkit.data.batching import DataError, Dataset
from bpkit.validate import report, text_problems


def default_corpus(max_chars: int = 2_000_000) -> str:
    """Python standard-library source files, sorted by name, concatenated up to ``max_chars``."""
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not parts:
        raise DataError(f"no Python source files found under {root}; set data.path to a text "
                        "file")
    return "".join(parts)[:max_chars]


def encode(text: str, vocab: str) -> np.ndarray:
    table = {c: i for i, c in enumerate(vocab)}
    return np.array([table[c] for c in text], np.int32)


def decode(tokens, vocab: str) -> str:
    return "".join(vocab[int(t)] for t in tokens)


def load_text(path: str | None = None, context: int = 64, max_chars: int = 2_000_000,
              encoding: str | None = None) -> Dataset:
    """Character tokens of ``path`` (or the default corpus); vocab = sorted distinct chars.

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

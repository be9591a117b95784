"""A sequence-to-sequence set generated offline: reverse a string of random letters.

Source ``x`` and target ``y = x[::-1]`` are ``(N, length)`` int32 tokens over the 26 letters
``a..z`` (token ``i`` is ``ALPHABET[i]``). The strings are drawn uniformly from seed 0, so the
set is the same on every machine; the test strings are held out (none occurs in the training
set).
"""
from __future__ import annotations

import numpy as np

from bpkit.data.batching import DataError, Dataset

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def load_reversal(num_train: int = 20000, num_test: int = 1000, length: int = 20,
                  seed: int = 0) -> Dataset:
    """``num_train`` / ``num_test`` random strings of ``length`` letters and their reversals."""
    if length < 2:
        raise DataError(f"data.context={length}: reversal needs strings of at least 2 letters")
    rng = np.random.default_rng(seed)
    strings = rng.integers(0, len(ALPHABET), (num_train + num_test, length)).astype(np.int32)
    train, test = strings[:num_train], strings[num_train:]
    seen = {row.tobytes() for row in train}
    test = test[[row.tobytes() not in seen for row in test]]  # held out: never trained on
    return Dataset("reverse", "seq2seq", train, train[:, ::-1].copy(), test,
                   test[:, ::-1].copy(), vocab=ALPHABET, context=length,
                   info={"task": f"reverse {length}-letter strings"})

"""The ``Dataset`` container and deterministic batching by ``(seed, step)``.

Classification and regression sets are shuffled once per epoch with a permutation drawn from
``(seed, epoch)``; the last partial batch of an epoch is dropped, so every batch has the same
shape and the step function compiles once. Sequence sets (``kind="lm"``) draw random windows
from ``(seed, step)``; sampler sets (``kind="sampler"``, the GAN's 2-D distributions) draw
fresh points from ``(seed, step)``; environment sets (``kind="env"``) draw fresh episode seeds
the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np


class DataError(ValueError):
    """Data that does not fit the model (feature shape, label range) or cannot be read."""


@dataclass
class Dataset:
    name: str
    # "classification" | "regression" | "lm" | "sampler" | "seq2seq" | "env" (episode seeds)
    kind: str
    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int | None = None         # classification: labels in [0, num_classes)
    vocab: str | None = None               # lm: the characters, index = token id
    context: int | None = None             # lm: tokens per sequence
    sampler: Callable[[np.random.Generator, int], np.ndarray] | None = None
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "lm":
            return (f"{self.name}: {len(self.x_train):,} train / {len(self.x_test):,} test "
                    f"characters, vocab {len(self.vocab)}, context {self.context}")
        if self.kind == "seq2seq":
            return (f"{self.name}: {len(self.x_train):,} train / {len(self.x_test):,} test "
                    f"sequence pairs of length {self.context}, vocab {len(self.vocab)}")
        if self.kind == "sampler":
            return f"{self.name}: sampled 2-D points ({self.info.get('distribution')})"
        if self.kind == "env":
            return f"{self.name}: episodes of the pure-JAX environment, one seed each"
        return (f"{self.name}: {len(self.x_train):,} train / {len(self.x_test):,} test examples, "
                f"features {tuple(self.x_train.shape[1:])}"
                + (f", {self.num_classes} classes" if self.num_classes else ""))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]])


def train_batch(ds: Dataset, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The training batch for ``step``: a pure function of ``(ds, step, batch_size, seed)``."""
    if ds.kind in ("sampler", "env"):
        return {"x": ds.sampler(_rng(seed, 2, step), batch_size)}
    if ds.kind == "lm":
        T = ds.context
        starts = _rng(seed, 1, step).integers(0, len(ds.x_train) - T - 1, size=batch_size)
        idx = starts[:, None] + np.arange(T)[None, :]            # (B, T)
        return {"x": ds.x_train[idx], "y": ds.x_train[idx + 1]}
    n = len(ds.x_train)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"data.batch_size={batch_size} is larger than the training set "
                        f"({n} examples); lower data.batch_size")
    epoch, k = divmod(int(step), per_epoch)
    perm = _rng(seed, 0, epoch).permutation(n)
    idx = perm[k * batch_size:(k + 1) * batch_size]
    return {"x": ds.x_train[idx], "y": ds.y_train[idx]}


def eval_batches(ds: Dataset, batch_size: int, max_batches: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape evaluation batches over the test split; ``mask`` is 0 on padding rows.

    A sampler (the GAN's 2-D toys) has no test split: its held-out set is ``max_batches``
    (default 4) batches drawn from stream 3 with seed 0 -- the same points for every run and
    disjoint from the training stream. An environment's held-out episodes (their seeds) are
    drawn the same way."""
    if ds.kind in ("sampler", "env"):
        for i in range(4 if max_batches is None else max_batches):
            yield {"x": ds.sampler(_rng(0, 3, i), batch_size),
                   "mask": np.ones(batch_size, np.float32)}
        return
    if ds.x_test is None:
        return
    if ds.kind == "lm":
        T = ds.context
        n_windows = (len(ds.x_test) - 1) // T
        starts = np.arange(n_windows) * T
        x = ds.x_test[starts[:, None] + np.arange(T)]
        y = ds.x_test[starts[:, None] + np.arange(T) + 1]
    else:
        x, y = ds.x_test, ds.y_test
    n = len(x)
    batch_size = min(batch_size, n)
    count = 0
    for lo in range(0, n, batch_size):
        if max_batches is not None and count >= max_batches:
            return
        xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
        pad = batch_size - len(xb)
        mask = np.ones(batch_size, np.float32)
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            yb = np.concatenate([yb, np.repeat(yb[-1:], pad, 0)])
            mask[-pad:] = 0.0
        count += 1
        yield {"x": xb, "y": yb, "mask": mask}


def validate_dataset(ds: Dataset, *, feature_shape: tuple | None = None,
                     num_classes: int | None = None, vocab_size: int | None = None) -> None:
    """Raise ``DataError`` unless the data fits the model: feature shape, label/token range."""
    problems = []
    if ds.kind in ("classification", "regression") and feature_shape is not None:
        got = tuple(ds.x_train.shape[1:])
        if got != tuple(feature_shape):
            problems.append(f"examples have feature shape {got} but the model expects "
                            f"{tuple(feature_shape)}")
    if ds.kind == "classification" and num_classes is not None:
        for split, y in (("train", ds.y_train), ("test", ds.y_test)):
            if y is None or not len(y):
                continue
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                problems.append(f"{split} labels span [{lo}, {hi}] but the model has "
                                f"{num_classes} classes (labels must be in [0, {num_classes}); "
                                f"set model.args.num_classes to at least {hi + 1}, or remove "
                                "it to take the number from the labels)")
    if ds.kind == "lm" and vocab_size is not None and len(ds.vocab) > vocab_size:
        problems.append(f"the corpus has {len(ds.vocab)} distinct characters but the model's "
                        f"vocab_size is {vocab_size}")
    if problems:
        raise DataError("data does not fit the model: " + "; ".join(problems))


__all__: list[Any] = ["Dataset", "DataError", "train_batch", "eval_batches", "validate_dataset"]

"""Real images offline: the 1,797 handwritten digits (8x8 pixels, 16 grey levels) that
scikit-learn ships inside its package (``sklearn.datasets.load_digits``; never downloaded).

The file is read straight from the installed package (``sklearn/datasets/data/digits.csv.gz``:
one row per image, 64 pixel values 0..16 then the label), which skips importing scikit-learn
(seconds); if a scikit-learn version moves the file, ``load_digits`` reads it instead.

Split: fixed, the same on every machine: a permutation drawn from seed 0 puts 1,437 images in
the training set and 360 (20%) in the test set. Images are ``(N, 8, 8, 1)`` float32 in [0, 1]
(pixel / 16), labels ``(N,)`` int32 in 0..9.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from bpkit.data.batching import DataError, Dataset

NUM_TEST = 360


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (1797, 64), labels (1797,))`` from the installed scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("data.name=digits needs scikit-learn, which ships the digits images "
                        "inside its package; install it with `pip install scikit-learn`")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                        "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (1797, 65)
        return table[:, :-1], table[:, -1].astype(np.int32)
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int32)


def load_digits_images() -> Dataset:
    """The digits as a classification set with the fixed 1,437 / 360 split."""
    pixels, labels = _read_digits()
    images = (pixels / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:-NUM_TEST], order[-NUM_TEST:]
    return Dataset("digits", "classification", images[train], labels[train], images[test],
                   labels[test], num_classes=10,
                   info={"source": "scikit-learn's bundled digits"})

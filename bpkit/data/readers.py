"""User data: ``.npz`` files (arrays ``x``/``y``, optionally ``x_test``/``y_test``) and
MNIST-format IDX files (the big-endian ``magic, dims, data`` layout of LeCun's MNIST)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from bpkit.data.batching import DataError, Dataset

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzipped) as a NumPy array."""
    if not os.path.isfile(path):
        raise DataError(f"IDX file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    body = np.frombuffer(data, dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims).astype(dtype.newbyteorder("="))


def _classification(name, x, y, x_test, y_test) -> Dataset:
    x = np.asarray(x, np.float32)
    x_test = np.asarray(x_test, np.float32)
    if np.issubdtype(np.asarray(y).dtype, np.floating):
        return Dataset(name, "regression", x, np.asarray(y, np.float32), x_test,
                       np.asarray(y_test, np.float32))
    y, y_test = np.asarray(y, np.int32), np.asarray(y_test, np.int32)
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise DataError(f"{name}: {len(x)} examples but {len(y)} labels "
                        f"(test: {len(x_test)} and {len(y_test)})")
    return Dataset(name, "classification", x, y, x_test, y_test,
                   num_classes=int(max(y.max(initial=0), y_test.max(initial=0))) + 1)


def load_npz(path: str, test_path: str | None = None, test_fraction: float = 0.2) -> Dataset:
    """``x``/``y`` (and ``x_test``/``y_test``, or a ``test_path`` file, or a held-out tail)."""
    for p in (path, test_path):
        if p and not os.path.isfile(p):
            raise DataError(f"data file not found: {p}")
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise DataError(f"{path} must hold arrays named 'x' and 'y' (has {list(f.keys())})")
        x, y = f["x"], f["y"]
        x_test = f["x_test"] if "x_test" in f else None
        y_test = f["y_test"] if "y_test" in f else None
    if test_path:
        with np.load(test_path) as f:
            x_test, y_test = f["x"], f["y"]
    if x_test is None:
        split = int(len(x) * (1 - test_fraction))
        x, x_test, y, y_test = x[:split], x[split:], y[:split], y[split:]
    return _classification(os.path.basename(path), x, y, x_test, y_test)


def load_idx(images: str, labels: str, test_images: str, test_labels: str,
             scale: float = 1 / 255) -> Dataset:
    """An MNIST-style set from four IDX files; images are scaled by ``scale``."""
    x, y = read_idx(images), read_idx(labels)
    x_test, y_test = read_idx(test_images), read_idx(test_labels)
    return _classification(os.path.basename(images), x * np.float32(scale), y,
                           x_test * np.float32(scale), y_test)

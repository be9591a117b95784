"""User data: ``.npz`` files (arrays ``x``/``y``, optionally ``x_test``/``y_test``) and
MNIST-format IDX files (the big-endian ``magic, dims, data`` layout of LeCun's MNIST)."""
from __future__ import annotations

import gzip
import os
import struct
import zipfile

import numpy as np

from bpkit.data.batching import DataError, Dataset
from bpkit.validate import label_problems, npz_problems, report

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


def _classification(name, x, y, x_test, y_test, *, role: str = "data.path",
                    path: str | None = None) -> Dataset:
    """A classification set (integer ``y``) or a regression set (float ``y``); integer labels
    are checked (``bpkit.validate.label_problems``) before their count sizes the model."""
    x = np.asarray(x, np.float32)
    x_test = np.asarray(x_test, np.float32)
    if np.issubdtype(np.asarray(y).dtype, np.floating):
        return Dataset(name, "regression", x, np.asarray(y, np.float32), x_test,
                       np.asarray(y_test, np.float32))
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise DataError(f"{name}: {len(x)} examples but {len(y)} labels "
                        f"(test: {len(x_test)} and {len(y_test)}); give one label per example")
    problems = label_problems(np.asarray(y), np.asarray(y_test), path or name, role)
    if problems:
        raise DataError(report(problems))
    y, y_test = np.asarray(y, np.int32), np.asarray(y_test, np.int32)
    return Dataset(name, "classification", x, y, x_test, y_test,
                   num_classes=int(max(y.max(initial=0), y_test.max(initial=0))) + 1)


def _read_npz(path: str, role: str) -> tuple[dict, list[str]]:
    """``({name: array or the exception reading it}, problems)`` of an .npz file (no pickles)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        return {}, [f"{role}: {path} is an .npy file (one array); save x and y together with "
                    "numpy.savez(path, x=features, y=labels)."]
    if not zipfile.is_zipfile(path):
        return {}, [f"{role}: {path} is not an .npz file (not a zip archive); save your arrays "
                    "with numpy.savez(path, x=features, y=labels)."]
    arrays: dict = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                try:
                    arrays[key] = f[key]
                except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
                    arrays[key] = e
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        return {}, [f"{role}: {path} cannot be read as .npz ({e}); save your arrays with "
                    "numpy.savez(path, x=features, y=labels)."]
    return arrays, []


def load_npz(path: str, test_path: str | None = None, test_fraction: float = 0.2) -> Dataset:
    """``x``/``y`` (and ``x_test``/``y_test``, or a ``test_path`` file, or a held-out tail).

    Every problem of the file(s) -- not an .npz, arrays that are not numbers, ``x`` without
    ``y``, ``x_test`` without ``y_test``, lengths or feature shapes that differ, labels that
    are not class indices -- is reported in one ``DataError``."""
    for role, p in (("data.path", path), ("data.test_path", test_path)):
        if p and os.path.isdir(p):
            raise DataError(f"{role}: {p} is a directory; give an .npz file")
        if p and not os.path.isfile(p):
            raise DataError(f"{role}: data file not found: {p}")
    arrays, problems = _read_npz(path, "data.path")
    if not problems:
        problems = npz_problems(arrays, path, "data.path")
    if test_path:
        test_arrays, test_problems = _read_npz(test_path, "data.test_path")
        if not test_problems:
            test_problems = npz_problems({k: v for k, v in test_arrays.items()
                                          if k in ("x", "y")}, test_path, "data.test_path")
        problems += test_problems
        if not problems:
            arrays["x_test"], arrays["y_test"] = test_arrays["x"], test_arrays["y"]
            problems = npz_problems(arrays, f"{path} with {test_path}", "data.path")
    if problems:
        raise DataError(report(problems))
    x, y = arrays["x"], arrays["y"]
    x_test, y_test = arrays.get("x_test"), arrays.get("y_test")
    if x_test is None:
        split = int(len(x) * (1 - test_fraction))
        if split < 1 or split == len(x):
            raise DataError(f"data.path: {path} has {len(x)} examples, too few to hold out "
                            f"{test_fraction:.0%} for testing; add examples, or give x_test/"
                            "y_test (or data.test_path).")
        x, x_test, y, y_test = x[:split], x[split:], y[:split], y[split:]
    return _classification(os.path.basename(path), x, y, x_test, y_test, path=path)


def load_idx(images: str, labels: str, test_images: str, test_labels: str,
             scale: float = 1 / 255) -> Dataset:
    """An MNIST-style set from four IDX files; images are scaled by ``scale``."""
    x, y = read_idx(images), read_idx(labels)
    x_test, y_test = read_idx(test_images), read_idx(test_labels)
    return _classification(os.path.basename(images), x * np.float32(scale), y,
                           x_test * np.float32(scale), y_test, role="data.labels_path",
                           path=f"{labels} / {test_labels}")

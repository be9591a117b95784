"""MNIST-1D (Greydanus 2020), generated offline with the ``mnist1d`` package.

The package's ``make_dataset`` builds the set procedurally from its templates (never its
download). The arrays are cached as ``.npz`` under ``cache_dir`` keyed by the generator
arguments, so later runs load in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from bpkit.data.batching import DataError, Dataset


def cache_dir(path: str | None = None) -> str:
    """``path``, else ``$BPKIT_CACHE``, else ``~/.cache/bpkit`` (absolute)."""
    return os.path.abspath(os.path.expanduser(path or os.environ.get("BPKIT_CACHE") or
                                              os.path.join("~", ".cache", "bpkit")))


def load_mnist1d(num_train: int = 4000, num_test: int = 1000, seed: int = 42,
                 cache: str | None = None) -> Dataset:
    """The MNIST-1D split: ``x`` float32 (N, 40), ``y`` int32 in [0, 10)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    total = num_train + num_test
    args.update(num_samples=total, train_split=num_train / total, seed=seed)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(cache), f"mnist1d-{key}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a corrupt cache file: regenerate it
            arrays = None
    else:
        arrays = None
    if arrays is None:
        state = np.random.get_state()  # make_dataset reseeds NumPy's global generator
        try:
            view = type("Args", (), {})()
            view.__dict__.update(args)
            d = make_dataset(view)
        finally:
            np.random.set_state(state)
        arrays = {"x": d["x"].astype(np.float32), "y": d["y"].astype(np.int32),
                  "x_test": d["x_test"].astype(np.float32),
                  "y_test": d["y_test"].astype(np.int32)}
        _write_cache(path, arrays)
    return Dataset("mnist1d", "classification", arrays["x"], arrays["y"], arrays["x_test"],
                   arrays["y_test"], num_classes=10, info={"generator": args})


def _write_cache(path: str, arrays: dict) -> None:
    """Save the generated arrays (atomically); ``DataError`` naming the directory if it cannot
    be written."""
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise DataError(f"cannot write the MNIST-1D cache {path}: {e.strerror or e} (errno "
                        f"{e.errno}); set data.cache_dir (or $BPKIT_CACHE) to a writable "
                        "directory") from None

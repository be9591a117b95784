"""``dataset_from_config``: the ``data`` section of a config to a ``Dataset``."""
from __future__ import annotations

from bpkit.data.batching import DataError, Dataset
from bpkit.data.digits import load_digits_images
from bpkit.data.episodes import load_env
from bpkit.data.finite import check_finite
from bpkit.data.mnist1d import load_mnist1d
from bpkit.data.readers import load_idx, load_npz
from bpkit.data.reversal import load_reversal
from bpkit.data.text import load_text
from bpkit.data.toy import load_regression1d, load_toy2d


def dataset_from_config(data_cfg, seed: int = 0) -> Dataset:
    """The dataset, refused (``DataError``) if a floating array holds NaN or Inf."""
    return check_finite(_load(data_cfg, seed), data_cfg.path)


def _load(data_cfg, seed: int) -> Dataset:
    c = data_cfg
    if c.name == "mnist1d":
        return load_mnist1d(c.num_train, c.num_test, cache=c.cache_dir)
    if c.name == "text":
        return load_text(c.path, c.context, c.max_chars, c.encoding, c.corpus)
    if c.name == "toy2d":
        return load_toy2d(c.distribution, c.noise)
    if c.name == "regression1d":
        return load_regression1d(c.num_train, c.num_test, c.noise)
    if c.name == "cartpole":
        return load_env(c.name)
    if c.name == "reverse":
        return load_reversal(c.num_train, c.num_test, c.context)
    if c.name == "digits":
        return load_digits_images()
    if c.name == "npz":
        if not c.path:
            raise DataError("data.name=npz needs data.path (an .npz file with arrays x and y)")
        return load_npz(c.path, c.test_path)
    if c.name == "idx":
        paths = [c.path, c.labels_path, c.test_path, c.test_labels_path]
        if not all(paths):
            raise DataError("data.name=idx needs data.path, data.labels_path, data.test_path "
                            "and data.test_labels_path (IDX files)")
        return load_idx(*paths)
    raise DataError(f"unknown data.name {c.name!r}")

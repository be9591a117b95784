"""Offline data for bpkit: MNIST-1D, character-level text, toy sets, scikit-learn's digits, user ``.npz``/IDX files.

Every set is a ``Dataset`` of host (NumPy) arrays. Batches are pure functions of
``(seed, step)`` (``train_batch``), so a resumed run sees exactly the batches an uninterrupted
run would have seen; evaluation batches have a fixed shape with a ``mask`` for the padding.
"""
from bpkit.data.batching import Dataset, DataError, eval_batches, train_batch, validate_dataset
from bpkit.data.mnist1d import load_mnist1d
from bpkit.data.readers import load_npz, read_idx, load_idx
from bpkit.data.text import load_text, default_corpus, decode, encode
from bpkit.data.toy import load_regression1d, load_toy2d, sample_toy2d
from bpkit.data.digits import load_digits_images
from bpkit.data.build import dataset_from_config

__all__ = ["Dataset", "DataError", "train_batch", "eval_batches", "validate_dataset",
           "load_mnist1d", "load_npz", "read_idx", "load_idx", "load_text", "default_corpus",
           "encode", "decode", "load_toy2d", "sample_toy2d", "load_regression1d",
           "dataset_from_config", "load_digits_images"]

"""Offline data: MNIST-1D from the generator, text, toys, .npz/IDX readers, deterministic
batches, and clear errors when data and model disagree."""
import gzip
import struct

import numpy as np
import pytest

from bpkit import cli
from bpkit.data import (DataError, eval_batches, load_idx, load_mnist1d, load_npz,
                        load_regression1d, load_text, load_toy2d, read_idx, train_batch,
                        validate_dataset)
from tests.train.helpers import CONFIGS


def test_mnist1d_split_and_cache(tmp_path):
    ds = load_mnist1d(cache=str(tmp_path))
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert set(np.unique(ds.y_train)) == set(range(10))
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("mnist1d-")
    again = load_mnist1d(cache=str(tmp_path))
    assert np.array_equal(again.x_train, ds.x_train)


def test_batches_are_pure_functions_of_seed_and_step():
    ds = load_mnist1d()
    a, b = train_batch(ds, 123, 64, 7), train_batch(ds, 123, 64, 7)
    assert np.array_equal(a["x"], b["x"]) and a["x"].shape == (64, 40)
    assert not np.array_equal(a["x"], train_batch(ds, 123, 64, 8)["x"])
    # One epoch (62 batches of 64) visits 62 * 64 distinct examples; the next epoch reshuffles.
    first = np.stack([train_batch(ds, s, 64, 0)["x"] for s in range(62)]).reshape(-1, 40)
    assert len(np.unique(first, axis=0)) == 62 * 64
    assert not np.array_equal(train_batch(ds, 0, 64, 0)["x"], train_batch(ds, 62, 64, 0)["x"])


def test_eval_batches_have_fixed_shape_and_mask():
    ds = load_regression1d(num_train=100, num_test=70)
    batches = list(eval_batches(ds, 32))
    assert [b["x"].shape for b in batches] == [(32, 1)] * 3
    assert sum(float(b["mask"].sum()) for b in batches) == 70


def test_text_default_corpus_is_offline():
    ds = load_text(context=16, max_chars=50_000)
    assert ds.kind == "lm" and len(ds.x_train) + len(ds.x_test) == 50_000
    b = train_batch(ds, 3, 4, 0)
    assert b["x"].shape == (4, 16) and np.array_equal(b["x"][:, 1:], b["y"][:, :-1])


def test_text_from_a_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 50)
    ds = load_text(str(path), context=8)
    assert ds.vocab == " dehlorw"
    with pytest.raises(DataError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_toys():
    pts = train_batch(load_toy2d("ring", 0.01), 0, 100, 0)["x"]
    assert pts.shape == (100, 2)
    np.testing.assert_allclose(np.linalg.norm(pts, axis=1), 2.0, atol=0.1)
    for dist in ("grid", "moons", "spiral"):
        assert train_batch(load_toy2d(dist), 1, 8, 0)["x"].shape == (8, 2)


def test_npz_and_idx_readers(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(50, 40)), y=rng.integers(0, 10, 50))
    ds = load_npz(str(tmp_path / "d.npz"))
    assert ds.x_train.shape == (40, 40) and ds.x_test.shape == (10, 40) and ds.num_classes <= 10

    def write_idx(path, arr, code):
        header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(
            f">{arr.ndim}I", *arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + arr.astype(arr.dtype.newbyteorder(">")).tobytes())

    images = rng.integers(0, 256, (12, 4, 5)).astype(np.uint8)
    labels = rng.integers(0, 3, 12).astype(np.uint8)
    write_idx(tmp_path / "im.gz", images, 0x08)
    write_idx(tmp_path / "lb.gz", labels, 0x08)
    assert np.array_equal(read_idx(str(tmp_path / "im.gz")), images)
    ds = load_idx(*(str(tmp_path / n) for n in ("im.gz", "lb.gz", "im.gz", "lb.gz")))
    assert ds.x_train.shape == (12, 4, 5) and ds.x_train.max() <= 1.0
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))


def test_validation_names_the_mismatch():
    ds = load_regression1d(num_train=10, num_test=5)
    with pytest.raises(DataError, match=r"feature shape \(1,\) but the model expects \(3,\)"):
        validate_dataset(ds, feature_shape=(3,))
    ds = load_mnist1d()
    with pytest.raises(DataError, match=r"labels span \[0, 9\] but the model has 5 classes"):
        validate_dataset(ds, num_classes=5)


def test_data_model_mismatch_exits_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(50, 7)).astype(np.float32),
             y=rng.integers(0, 12, 50))
    code = cli.main(["parity", f"{CONFIGS}/mnist1d_mlp.yaml", "data.name=npz",
                     f"data.path={tmp_path / 'd.npz'}", "data.batch_size=8",
                     "model.args.in_features=40", "model.args.num_classes=10"])
    err = capsys.readouterr().err
    assert code == 2 and "data does not fit model mlp" in err, err
    code = cli.main(["parity", f"{CONFIGS}/mnist1d_mlp.yaml", "data.name=npz",
                     f"data.path={tmp_path / 'd.npz'}", "data.batch_size=8",
                     "model.args.num_classes=10"])
    err = capsys.readouterr().err
    assert code == 2 and "labels span" in err and "10 classes" in err, err

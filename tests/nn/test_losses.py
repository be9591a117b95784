"""Losses and metrics: values against direct formulas, per-example shapes, parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpkit.nn import losses
from bpkit.testing import assert_parity


def _n(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy(fused, smoothing):
    z = _n(0, (4, 5))
    y = jnp.array([0, 4, 2, 2], jnp.int32)
    out = losses.softmax_cross_entropy(z, y, smoothing, fused=fused)
    logp = np.asarray(jax.nn.log_softmax(z))
    q = (1 - smoothing) * np.eye(5)[np.asarray(y)] + smoothing / 5
    np.testing.assert_allclose(out, -(q * logp).sum(-1), rtol=1e-12)
    assert_parity(lambda z: jnp.sum(losses.softmax_cross_entropy(z, y, smoothing, fused=fused)
                                    * _n(1, (4,))), z)


def test_sequence_cross_entropy_shape():
    out = losses.softmax_cross_entropy(_n(0, (2, 3, 7)), jnp.zeros((2, 3), jnp.int32))
    assert out.shape == (2, 3)


def test_binary_cross_entropy_with_logits():
    z, t = 5 * _n(0, (6, 2)), jnp.asarray(np.random.default_rng(1).uniform(size=(6, 2)))
    s = 1 / (1 + np.exp(-np.asarray(z)))
    expected = -(t * np.log(s) + (1 - t) * np.log(1 - s)).mean(-1)
    out = losses.binary_cross_entropy_with_logits(z, t)
    assert out.shape == (6,)
    np.testing.assert_allclose(out, expected, rtol=1e-10)
    assert_parity(lambda z: jnp.sum(losses.binary_cross_entropy_with_logits(z, t)), z)
    assert np.isfinite(losses.binary_cross_entropy_with_logits(jnp.array([1e4, -1e4]),
                                                                jnp.array([0.0, 1.0]))).all()


def test_mse_and_huber():
    p, t = _n(0, (5, 3)), _n(1, (5, 3))
    np.testing.assert_allclose(losses.mse(p, t), ((p - t) ** 2).mean(-1), rtol=1e-12)
    r = np.abs(np.asarray(p - t))
    expected = np.where(r <= 0.5, 0.5 * r ** 2, 0.5 * (r - 0.25)).mean(-1)
    np.testing.assert_allclose(losses.huber(p, t, 0.5), expected, rtol=1e-12)
    assert losses.mse(p[:, 0], t[:, 0]).shape == (5,)
    assert_parity(lambda p: jnp.sum(losses.mse(p, t)), p)
    assert_parity(lambda p: jnp.sum(losses.huber(p, t, 0.5)), p)
    with pytest.raises(ValueError, match="no implicit broadcasting"):
        losses.mse(p, t[:, :1])


def test_accuracy():
    z = jnp.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]], jnp.float32)
    acc = losses.accuracy(z, jnp.array([1, 0, 0], jnp.int32))
    assert acc.dtype == jnp.float32 and float(acc) == pytest.approx(2 / 3)

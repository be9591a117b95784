"""Parity table for bpkit/rules/windows.py (pooling), row for row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpkit
from tests.rules.harness import Case, args, const, parametrize, assert_case_parity, uniform

NCHW = lambda h, w: (1, 1, h, w)  # noqa: E731  window/stride tuples over NCHW
NHWC = lambda h, w: (1, h, w, 1)  # noqa: E731


def pool(op, x_shape, name, window, strides=None, padding="VALID", base_dilation=None,
         window_dilation=None, make_x=None, fd=True):
    """A case ``lax.reduce_window(x, init, op, ...)`` with the op's identity as init."""
    init = {"add": 0.0, "max": -np.inf, "min": np.inf}[op]
    fn = {"add": lax.add, "max": lax.max, "min": lax.min}[op]

    def fun(x):
        return lax.reduce_window(x, init, fn, window, strides or window,
                                 padding, base_dilation, window_dilation)
    return Case(name, fun, args(make_x or uniform(*x_shape)), fd=fd)


def avg_pool(x, window, strides, padding):
    """Average pooling as flax writes it: a sum pool divided by the window size."""
    return lax.reduce_window(x, 0.0, lax.add, window, strides,
                             padding) / float(np.prod(window))


def _gather_add(t, x, select_prim, base_dilation):
    """select_and_gather_add: per 2x2 window (stride 2, padded), t where x is selected."""
    return lax.select_and_gather_add_p.bind(
        t, x, select_prim=select_prim, window_dimensions=NCHW(2, 2), window_strides=NCHW(2, 1),
        padding=((0, 0), (0, 0), (0, 1), (1, 0)), base_dilation=(1, 1) + base_dilation,
        window_dilation=(1, 1, 1, 1))


_rng = np.random.default_rng(7)
TIES = _rng.integers(0, 3, size=(2, 2, 5, 5)).astype(float)  # many equal values per window
CONST = np.ones((2, 2, 5, 5))  # every window is one big tie

CASES = [
    # reduce_window_sum (average pooling)
    Case("avg_pool1d", lambda x: avg_pool(x, (1, 1, 3), (1, 1, 2), "VALID"), args(uniform(2, 3, 7))),
    pool("add", (2, 3, 6, 6), "sum_pool2d_nchw_2x2_stride2", NCHW(2, 2)),
    Case("avg_pool2d_nhwc_overlap_same", lambda x: avg_pool(x, NHWC(3, 3), NHWC(2, 2), "SAME"),
         args(uniform(2, 5, 5, 3))),
    pool("add", (2, 3, 5, 5), "sum_pool2d_asymmetric_pad", NCHW(3, 2), NCHW(2, 1),
         ((0, 0), (0, 0), (2, 1), (0, 1))),
    pool("add", (2, 2, 7, 6), "sum_pool2d_window_dilation", NCHW(2, 3), NCHW(2, 1),
         ((0, 0), (0, 0), (1, 0), (0, 2)), window_dilation=NCHW(2, 2)),
    pool("add", (2, 2, 4, 5), "sum_pool2d_base_dilation", NCHW(3, 3), NCHW(2, 1),
         ((0, 0), (0, 0), (1, 1), (0, 2)), base_dilation=NCHW(2, 1)),
    pool("add", (2, 2, 4, 4, 4), "sum_pool3d", (1, 1, 2, 2, 2), (1, 1, 2, 1, 2), "SAME"),
    # reduce_window_max (max pooling)
    pool("max", (2, 3, 7), "max_pool1d_overlap", (1, 1, 3), (1, 1, 2)),
    pool("max", (2, 3, 6, 6), "max_pool2d_nchw_2x2_stride2", NCHW(2, 2)),
    pool("max", (2, 5, 5, 3), "max_pool2d_nhwc_overlap_same", NHWC(3, 3), NHWC(2, 2), "SAME"),
    pool("max", (2, 3, 5, 5), "max_pool2d_asymmetric_pad", NCHW(3, 2), NCHW(2, 1),
         ((0, 0), (0, 0), (2, 1), (0, 1))),
    pool("max", (2, 2, 5, 5), "max_pool2d_ties_constant", NCHW(3, 3), NCHW(2, 2),
         ((0, 0), (0, 0), (1, 1), (1, 0)), make_x=const(CONST), fd=False),
    pool("max", (2, 2, 5, 5), "max_pool2d_ties_some", NCHW(3, 3), NCHW(2, 1), "SAME",
         make_x=const(TIES), fd=False),
    pool("max", (2, 2, 4, 5), "max_pool2d_base_dilation", NCHW(3, 3), NCHW(2, 1),
         ((0, 0), (0, 0), (1, 1), (0, 2)), base_dilation=NCHW(2, 1)),
    pool("max", (2, 2, 4, 4, 4), "max_pool3d", (1, 1, 2, 2, 2), (1, 1, 2, 1, 2), "SAME"),
    # reduce_window_min
    pool("min", (2, 3, 5, 5), "min_pool2d_overlap_same", NCHW(3, 3), NCHW(2, 2), "SAME"),
    pool("min", (2, 2, 5, 5), "min_pool2d_ties_constant", NCHW(3, 3), NCHW(2, 2),
         ((0, 0), (0, 0), (1, 1), (1, 0)), make_x=const(CONST), fd=False),
    pool("min", (2, 2, 5, 5), "min_pool2d_ties_some", NCHW(2, 3), NCHW(1, 2), "SAME",
         make_x=const(TIES), fd=False),
    # zero-size operands
    pool("add", (2, 0, 4, 4), "sum_pool_zero_channels", NCHW(2, 2)),
    pool("max", (0, 2, 4, 4), "max_pool_zero_batch", NCHW(2, 2), NCHW(1, 1), "SAME"),
    # JAX's own max-pool gradient primitives, met in second order through a jax.grad
    Case("select_and_gather_add", lambda t, x: _gather_add(t, x, lax.ge_p, (1, 1)),
         args(uniform(2, 1, 5, 4), uniform(2, 1, 5, 4)), argnums=(0, 1)),
    Case("select_and_gather_add_min_base_dilated", lambda t, x: _gather_add(t, x, lax.le_p, (2, 1)),
         args(uniform(2, 1, 5, 4), uniform(2, 1, 5, 4)), argnums=(0, 1)),
    Case("select_and_scatter_add_in_a_jax_grad",
         lambda x: jax.grad(lambda y: jnp.sum(lax.reduce_window(
             y, -jnp.inf, lax.max, NCHW(2, 2), NCHW(2, 1), "SAME") ** 2))(x),
         args(uniform(2, 1, 5, 4))),
]


@parametrize(CASES)
def test_windows(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


def _weighted(fun, x):
    w = jnp.asarray(np.random.default_rng(0).standard_normal(jax.eval_shape(fun, x).shape))
    return lambda x: jnp.sum(fun(x) * w)


@pytest.mark.parametrize("op,init", [(lax.max, -np.inf), (lax.min, np.inf)])
def test_chooser_special_values_match_jax(op, init):
    """Windows of -inf (+inf for min) next to padding, and NaNs: the cotangent goes where
    jax.grad sends it (padding can win a window of identities; a NaN takes over)."""
    x = np.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 2, 5, 5)))
    x[0, 0, :2] = init
    x[1, 1, :, 0] = init
    x[0, 1, 2, 2] = x[1, 0, 0, 3] = np.nan
    x = jnp.asarray(x)
    for base_dilation in (None, NCHW(2, 1)):
        loss = _weighted(lambda x: lax.reduce_window(
            x, init, op, NCHW(3, 3), NCHW(2, 1),
            ((0, 0), (0, 0), (1, 1), (0, 2)), base_dilation), x)
        np.testing.assert_allclose(bpkit.grad(loss)(x), jax.grad(loss)(x), rtol=1e-12, atol=0)


def test_max_pool_window_dilation_against_forward_mode():
    """jax.grad has no max-pool VJP with window dilation; forward mode (select_and_gather_add)
    does, so compare with the Jacobian from jax.jacfwd."""
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 2, 7, 6)))
    loss = _weighted(lambda x: lax.reduce_window(
        x, -jnp.inf, lax.max, NCHW(2, 3), NCHW(2, 1), ((0, 0), (0, 0), (1, 0), (0, 2)),
        window_dilation=NCHW(2, 2)), x)
    np.testing.assert_allclose(bpkit.grad(loss)(x), jax.jacfwd(loss)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,init", [(lax.add, 0.0), (lax.max, -np.inf)])
def test_pooling_second_order(op, init):
    """The pooling rules use only ops bpkit differentiates, so bpkit.grad nests."""
    x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 2, 5, 5)))

    def loss(x):
        y = lax.reduce_window(jnp.sin(x), init, op, NCHW(3, 3), NCHW(2, 2), "SAME")
        return jnp.sum(jnp.tanh(y))

    def gnorm(grad):
        return lambda x: jnp.sum(grad(loss)(x) ** 2)

    np.testing.assert_allclose(bpkit.grad(gnorm(bpkit.grad))(x), jax.grad(gnorm(jax.grad))(x),
                               rtol=1e-9, atol=1e-12)


def test_generic_reduce_window_is_refused():
    x = jnp.arange(1.0, 6.0)
    prod_pool = lambda x: jnp.sum(lax.reduce_window(x, 1.0, lax.mul, (2,), (1,), "VALID"))  # noqa: E731
    with pytest.raises(NotImplementedError, match="custom reduction"):
        bpkit.grad(prod_pool)(x)

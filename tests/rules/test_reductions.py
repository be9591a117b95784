"""Parity table for bpkit/rules/reductions.py, row for row."""
import jax
import jax.numpy as jnp
import pytest
import numpy as np
from jax import lax

import bpkit
from tests.rules.harness import (WITH_COMPLEX, Case, args, assert_case_parity, const, parametrize,
                                 uniform)

S = (3, 4, 5)
# linear in the operand: complex64 by default, complex128 with finite differences under -m slow
LINEAR_COMPLEX = dict(dtypes=WITH_COMPLEX, slow_modes=("complex128-eager",))


def _reduce_pair(x, y, dims):
    """JAX's testReducePairGrad: one reduction that sums x and multiplies y."""
    return lax.reduce((x, y), (jnp.zeros((), x.dtype), jnp.ones((), y.dtype)),
                      lambda a, b: (a[0] + b[0], a[1] * b[1]), dims)


def _iota(x, axis):
    return lax.broadcasted_iota(x.dtype, x.shape, axis)


def _max_with_index(x, index, dims):
    """A max that carries the position it came from (the first one, at ties) along."""
    def pick(a, b):
        take_a = a[0] >= b[0]
        return lax.select(take_a, a[0], b[0]), lax.select(take_a, a[1], b[1])
    return lax.reduce((x, index), (jnp.full((), -jnp.inf, x.dtype), jnp.zeros((), index.dtype)),
                      pick, dims)

CASES = [
    Case("reduce_sum", lambda x: lax.reduce_sum(x, (0, 2)), args(uniform(*S)),
         **LINEAR_COMPLEX),
    Case("reduce_sum_all", jnp.sum, args(uniform(*S))),
    Case("reduce_max", lambda x: jnp.max(x, axis=1), args(uniform(*S))),
    Case("reduce_max_ties_split_evenly", lambda x: jnp.max(x, axis=1),
         args(const(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]))), fd=False),
    Case("reduce_min", lambda x: jnp.min(x, axis=(0, 2)), args(uniform(*S))),
    Case("reduce_min_ties_split_evenly", lambda x: jnp.min(x),
         args(const(np.array([[0.5, 3.0], [0.5, 1.0]]))), fd=False),
    Case("reduce_prod", lambda x: jnp.prod(x, axis=1), args(uniform(*S, lo=0.5, hi=1.5)),
         dtypes=WITH_COMPLEX),
    Case("reduce_prod_with_zeros", lambda x: jnp.prod(x, axis=1),
         args(const(np.array([[0.0, 2.0, 3.0], [0.0, 0.0, 2.0], [1.0, 2.0, 3.0]]))), fd=False,
         dtypes=WITH_COMPLEX),
    Case("reduce_prod_two_axes", lambda x: jnp.prod(x, axis=(0, 2)),
         args(uniform(2, 3, 2, lo=0.5, hi=1.5))),
    Case("reduce_prod_zero_length_axis", lambda x: jnp.prod(x, axis=1), args(uniform(3, 0))),
    Case("reduce_prod_over_kept_zero_size", lambda x: jnp.prod(x, axis=1), args(uniform(0, 3))),
    Case("reduce_sum_max_zero_size", lambda x: (jnp.sum(x, axis=0), jnp.max(x, axis=1)),
         args(uniform(0, 3))),
    Case("cumsum", lambda x: lax.cumsum(x, axis=1), args(uniform(*S)),
         **LINEAR_COMPLEX),
    Case("cumsum_reverse", lambda x: lax.cumsum(x, axis=0, reverse=True), args(uniform(*S))),
    Case("cumprod", lambda x: lax.cumprod(x, axis=1), args(uniform(3, 4, lo=0.5, hi=1.5)),
         dtypes=WITH_COMPLEX),
    Case("cumprod_reverse", lambda x: lax.cumprod(x, axis=0, reverse=True),
         args(uniform(3, 4, lo=0.5, hi=1.5))),
    Case("cummax", lambda x: lax.cummax(x, axis=1), args(uniform(3, 5))),
    Case("cummin_reverse", lambda x: lax.cummin(x, axis=1, reverse=True), args(uniform(3, 5))),
    Case("cumlogsumexp", lambda x: lax.cumlogsumexp(x, axis=0), args(uniform(4, 3))),
    Case("cumulative_zero_size", lambda x: (lax.cumsum(x, 0), lax.cumprod(x, 0), lax.cummax(x, 1)),
         args(uniform(0, 3))),
    # general reduce (lax.reduce with a computation that is not a plain monoid)
    Case("reduce_pair_sum_and_product", lambda x, y: _reduce_pair(x, y, (1,)),
         args(uniform(3, 4, 5), uniform(3, 4, 5, lo=0.5, hi=1.5)), argnums=(0, 1)),
    Case("reduce_pair_odd_sizes_all_axes", lambda x, y: _reduce_pair(x, y, (0, 1, 2)),
         args(uniform(3, 1, 5), uniform(3, 1, 5, lo=0.5, hi=1.5)), argnums=(0, 1)),
    Case("reduce_pair_zero_length", lambda x, y: _reduce_pair(x, y, (1,)),
         args(uniform(3, 0, 5), uniform(3, 0, 5)), argnums=(0, 1)),
    Case("reduce_max_with_argmax", lambda x: _max_with_index(x, x * 0 + _iota(x, 1), (1,)),
         args(uniform(4, 5))),
    Case("reduce_max_with_argmax_ties", lambda x: _max_with_index(x, x * 0 + _iota(x, 1), (1,)),
         args(const(np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]]))), fd=False),
]


@parametrize(CASES)
def test_reductions(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


def test_reduce_max_with_integer_index_gives_the_float_index_gradient():
    """With an integer index operand JAX's own gradient crashes (its tree reduction cannot
    reshape the index's symbolic-zero tangent); bpkit gives what JAX gives for a float index."""
    x = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, -1.0, 5.0, 5.0]])
    f_int = lambda x: jnp.sum(_max_with_index(x, _iota(x, 1).astype(jnp.int32), (1,))[0] * x[:, 0])
    f_float = lambda x: jnp.sum(_max_with_index(x, x * 0 + _iota(x, 1), (1,))[0] * x[:, 0])
    np.testing.assert_allclose(bpkit.grad(f_int)(x), jax.grad(f_float)(x), rtol=1e-12)


def test_reduce_refuses_differentiated_initial_values():
    f = lambda x, s: jnp.sum(lax.reduce((x, x), (s, s), lambda a, b: (a[0] + b[0], a[1] * b[1]), (0,))[1])
    with pytest.raises(bpkit.UnsupportedPrimitiveError, match="initial values"):
        bpkit.grad(f, (0, 1))(jnp.ones(3), 1.0)

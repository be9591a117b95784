"""Parity table for bpkit/rules/reductions.py, row for row."""
import jax.numpy as jnp
import numpy as np
from jax import lax

from tests.rules.harness import (WITH_COMPLEX, Case, args, assert_case_parity, const, parametrize,
                                 uniform)

S = (3, 4, 5)
# linear in the operand: complex64 by default, complex128 with finite differences under -m slow
LINEAR_COMPLEX = dict(dtypes=WITH_COMPLEX, slow_modes=("complex128-eager",))

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
]


@parametrize(CASES)
def test_reductions(case, dtype, jit):
    assert_case_parity(case, dtype, jit)

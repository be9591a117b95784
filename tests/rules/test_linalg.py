"""Parity table for bpkit/rules/linalg.py (dot_general), row for row."""
import jax.numpy as jnp
from jax import lax

from tests.rules.harness import (COMPLEX, WITH_COMPLEX, Case, args, assert_case_parity, const,
                                 parametrize, real_arg, uniform)


def dot(name, lhs_shape, rhs_shape, dims, dtypes=WITH_COMPLEX, **kw):
    """Row ``dot_general(x, y, dims)``; complex64 by default, complex128 (finite differences)
    under ``-m slow``."""
    return Case(name, lambda x, y: lax.dot_general(x, y, dims, **kw),
                args(uniform(*lhs_shape), uniform(*rhs_shape)), argnums=(0, 1), dtypes=dtypes,
                slow_modes=("complex128-eager",))


CASES = [
    dot("matmul", (3, 4), (4, 5), (((1,), (0,)), ((), ()))),
    dot("matvec", (3, 4), (4,), (((1,), (0,)), ((), ()))),
    dot("inner", (4,), (4,), (((0,), (0,)), ((), ()))),
    dot("outer", (3,), (4,), (((), ()), ((), ()))),
    dot("contract_transposed", (4, 3), (5, 4), (((0,), (1,)), ((), ()))),
    dot("two_contracting_dims_out_of_order", (2, 3, 4), (4, 5, 3), (((1, 2), (2, 0)), ((), ()))),
    dot("batch", (2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),
    dot("batch_in_the_middle", (3, 2, 4), (4, 5, 2), (((2,), (0,)), ((1,), (2,)))),
    dot("two_batch_dims", (2, 3, 4, 5), (3, 2, 5), (((3,), (2,)), ((0, 1), (1, 0)))),
    dot("preferred_element_type", (3, 4), (4, 2), (((1,), (0,)), ((), ())),
        dtypes=("float32", "float64"), preferred_element_type=jnp.float64),
    Case("int_operand", lambda x, n: lax.dot_general(x, n, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=x.dtype),
         args(uniform(3, 4), const(jnp.arange(8, dtype=jnp.int32).reshape(4, 2)))),
    Case("einsum_attention_like", lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k),
         args(uniform(2, 2, 3, 4), uniform(2, 2, 5, 4)), argnums=(0, 1)),
    Case("real_times_complex", lambda x, y: lax.dot_general(x, y, (((1,), (0,)), ((), ()))),
         args(real_arg(uniform(3, 4)), uniform(4, 2)), argnums=(0, 1), dtypes=COMPLEX),
    Case("complex_vdot_real_loss", lambda x, y: jnp.abs(jnp.vdot(x, y)),
         args(uniform(5), uniform(5)), argnums=(0, 1), dtypes=COMPLEX),
    dot("zero_size_contraction", (3, 0), (0, 4), (((1,), (0,)), ((), ()))),
    dot("zero_size_free_axis", (0, 4), (4, 2), (((1,), (0,)), ((), ()))),
    # ragged_dot_general (mixture-of-experts grouped matmul); group 1 is empty
    Case("ragged_dot", lambda x, w, g: lax.ragged_dot(x, w, g),
         args(uniform(7, 3), uniform(3, 3, 5), const(jnp.array([2, 0, 5], jnp.int32))),
         argnums=(0, 1)),
    Case("ragged_dot_general_batch_and_transposed_rhs",
         lambda x, w, g: lax.ragged_dot_general(x, w, g, _RAGGED_BATCHED),
         args(uniform(2, 6, 3), uniform(2, 5, 3, 3), const(jnp.array([1, 2, 3], jnp.int32))),
         argnums=(0, 1)),
]

# lhs (b, m, k) ragged in m; rhs (b, n, k, g): batch b, contract k, group axis last
_RAGGED_BATCHED = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((2,), (2,)), ((0,), (0,))), lhs_ragged_dimensions=[1],
    rhs_group_dimensions=[3])


@parametrize(CASES)
def test_linalg(case, dtype, jit):
    assert_case_parity(case, dtype, jit)

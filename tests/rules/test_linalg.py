"""Parity table for bpkit/rules/linalg.py (dot_general), row for row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpkit
from bpkit.rules import linalg

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
    dot("matmul_transposed_rhs", (3, 4), (5, 4), (((1,), (1,)), ((), ()))),
    dot("dense_on_3d_input", (2, 3, 4), (4, 5), (((2,), (0,)), ((), ()))),
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
         argnums=(0, 1), dtypes=("float64",)),
]

# lhs (b, m, k) ragged in m; rhs (b, n, k, g): batch b, contract k, group axis last
_RAGGED_BATCHED = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((2,), (2,)), ((0,), (0,))), lhs_ragged_dimensions=[1],
    rhs_group_dimensions=[3])


@parametrize(CASES)
def test_linalg(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


@pytest.mark.parametrize("w_shape, dims, barriers", [
    ((8, 12), (((1,), (0,)), ((), ())), 1),  # transpose(x) @ g
    ((12, 8), (((1,), (1,)), ((), ())), 1),  # a weight stored (out, in): transpose(g) @ x
    ((8, 2), (((1,), (0,)), ((), ())), 2),   # a narrow head: transpose(transpose(g) @ x)
])
def test_small_weight_gradients_are_plain_products_of_transposes_on_cpu(
        monkeypatch, w_shape, dims, barriers):
    """On CPU a dense layer's weight gradient ``x^T g`` with small operands is a product of an
    explicit (barriered) transpose (``linalg._small_transposed_product``); for one example, or
    with a limit of 0 bytes, it is the one ``dot_general``. Both give jax.grad's value."""
    def loss(w, x):
        return jnp.sum(jnp.tanh(lax.dot_general(x, w, dims)))

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    reference = jax.grad(loss)(w, x)

    def count_barriers(x):
        jaxpr = jax.make_jaxpr(bpkit.grad(loss))(w, x)
        return sum(e.primitive is lax.optimization_barrier_p for e in jaxpr.eqns)

    transposed = jax.jit(bpkit.grad(loss))(w, x)
    assert count_barriers(x) == (barriers if jax.default_backend() == "cpu" else 0)
    assert count_barriers(x[:1]) == 0  # one example (as under vmap): an outer product
    monkeypatch.setattr(linalg, "SMALL_TRANSPOSE_BYTES", 0)
    assert count_barriers(x) == 0
    one_product = jax.jit(bpkit.grad(loss))(w, x)
    np.testing.assert_allclose(transposed, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_product, reference, rtol=1e-5, atol=1e-6)

"""Parity table for bpkit/rules/slicing.py, row for row.

Index arguments are integer arrays (never differentiated); under jit they are traced, so the
rules see traced indices. Repeated indices, out-of-bounds indices (fill/drop and clip modes) and
ties (sort, top_k, scatter max/min) are covered: their numbers follow jax.grad's conventions.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpkit.engine import registry
from tests.rules.harness import Case, args, const, parametrize, assert_case_parity, uniform


def ints(values):
    return const(np.asarray(values, np.int32))


REPEATED = ints([0, 2, 2, -1])  # row 2 twice, and the last row through a negative index
OUT_OF_BOUNDS = ints([0, 7, 2, 2])  # row 7 of 4 does not exist
WINDOWS = lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(),
                                     start_index_map=(0, 1))
# Distinct values with ties: 1.0 three times, -0.5 twice (finite differences are undefined there).
TIES = const(np.array([[1.0, -0.5, 1.0, 2.0, -0.5], [0.0, 1.0, 0.0, 0.0, 3.0]]))

CASES = [
    # slice
    Case("slice_rows", lambda x: x[1:3], args(uniform(4, 3))),
    Case("slice_every_other", lambda x: x[::2], args(uniform(5, 3))),
    Case("slice_strided_2d", lambda x: x[1::2, ::3], args(uniform(6, 5))),
    Case("slice_stride_overshoots_limit", lambda x: lax.slice(x, (0,), (5,), (3,)), args(uniform(6))),
    Case("slice_empty_and_full", lambda x: (x[2:2], x[:, :]), args(uniform(4, 3))),
    Case("slice_of_zero_size", lambda x: x[1:, :0], args(uniform(0, 3))),
    # dynamic_slice
    Case("dynamic_slice_traced_index", lambda x, i: lax.dynamic_slice(x, (i, 1), (2, 2)),
         args(uniform(4, 3), const(1))),
    Case("dynamic_slice_clamped_start", lambda x, i: lax.dynamic_slice(x, (i, i), (2, 2)),
         args(uniform(4, 3), const(5))),
    Case("dynamic_index_in_dim", lambda x, i: lax.dynamic_index_in_dim(x, i, 1, keepdims=False),
         args(uniform(3, 4), const(2))),
    # a negative start that reaches the primitive clamps to 0 (no wrap-around there)
    Case("dynamic_slice_negative_start_at_primitive",
         lambda x, i: lax.dynamic_slice_p.bind(x, i, i, slice_sizes=(2, 2)),
         args(uniform(5, 4), ints(-1))),
    Case("dynamic_slice_negative_start_wrapped", lambda x, i: lax.dynamic_slice(x, (i, i), (2, 2)),
         args(uniform(5, 4), ints(-3))),
    Case("dynamic_index_far_negative", lambda x: lax.dynamic_index_in_dim(x, -8, 0),
         args(uniform(5, 5))),  # JAX's testDynamicSliceValueAndGrad
    Case("dynamic_slice_bfloat16", lambda x, i: lax.dynamic_slice(x, (i,), (2,)),
         args(uniform(5), ints(1)), dtypes=("bfloat16",)),
    Case("dynamic_slice_zero_size", lambda x, i: lax.dynamic_slice(x, (i, i), (0, 2)),
         args(uniform(3, 4), ints(1))),
    # dynamic_update_slice
    Case("dynamic_update_slice", lambda x, u, i: lax.dynamic_update_slice(x, u, (i, 0)),
         args(uniform(4, 3), uniform(2, 3), const(1)), argnums=(0, 1)),
    Case("dynamic_update_slice_clamped", lambda x, u, i: lax.dynamic_update_slice(x, u * x[:2, :2], (i, i)),
         args(uniform(4, 3), uniform(2, 2), const(9)), argnums=(0, 1)),
    Case("dynamic_update_slice_negative_start_at_primitive",
         lambda x, u, i: lax.dynamic_update_slice_p.bind(x, u * x[:2, :2], i, i),
         args(uniform(4, 3), uniform(2, 2), ints(-1)), argnums=(0, 1)),
    Case("dynamic_update_index_far_negative",
         lambda x, y: lax.dynamic_update_index_in_dim(x, y, -8, 0),
         args(uniform(5, 5), uniform(1, 5)), argnums=(0, 1)),  # testDynamicUpdateSliceValueAndGrad
    Case("dynamic_update_slice_zero_size_update",
         lambda x, u, i: lax.dynamic_update_slice(x, u, (i, i)),
         args(uniform(4, 3), uniform(0, 2), ints(1)), argnums=(0, 1)),
    # gather
    Case("index_repeated_rows", lambda x, i: x[i], args(uniform(4, 3), REPEATED)),
    Case("embedding_lookup_repeated_ids", lambda table, ids: table[ids],
         args(uniform(6, 4), ints([[1, 5, 1], [0, 1, 5]]))),
    Case("gather_2d_points", lambda x, i, j: x[i, j],
         args(uniform(4, 5), ints([0, 3, 3, 1]), ints([4, 2, 2, 0]))),
    Case("take_along_axis", lambda x, i: jnp.take_along_axis(x, i, axis=1),
         args(uniform(3, 4), ints([[0, 0, 3], [2, 1, 2], [3, 3, 3]]))),
    Case("argsort_gather", lambda x: jnp.take_along_axis(x, jnp.argsort(x, axis=1), axis=1) * x,
         args(uniform(3, 4))),
    Case("take_fill_mode", lambda x, i: x.at[i].get(mode="fill", fill_value=0.0),
         args(uniform(4, 3), OUT_OF_BOUNDS)),
    Case("take_clip_mode", lambda x, i: x.at[i].get(mode="clip"), args(uniform(4, 3), OUT_OF_BOUNDS)),
    Case("jnp_take_axis1", lambda x, i: jnp.take(x, i, axis=1), args(uniform(3, 4), ints([3, 0, 3, 5]))),
    Case("gather_zero_indices", lambda x, i: x[i], args(uniform(4, 3), ints(np.zeros(0, np.int32)))),
    Case("gather_overlapping_windows",
         lambda x, s: lax.gather(x, s, WINDOWS, (2, 3), mode="clip"),
         args(uniform(4, 5), ints([[0, 0], [1, 2], [1, 2], [3, 4]]))),
    # scatter-add
    Case("at_add_repeated", lambda x, u, i: x.at[i].add(u),
         args(uniform(4, 3), uniform(4, 3), REPEATED), argnums=(0, 1)),
    Case("at_add_out_of_bounds_dropped", lambda x, u, i: x.at[i].add(u * u),
         args(uniform(4, 3), uniform(4, 3), OUT_OF_BOUNDS), argnums=(0, 1)),
    Case("at_add_clip_mode", lambda x, u, i: x.at[i].add(u, mode="clip"),
         args(uniform(4, 3), uniform(4, 3), OUT_OF_BOUNDS), argnums=(0, 1)),
    Case("segment_sum", lambda d, s: jax.ops.segment_sum(d, s, num_segments=3),
         args(uniform(5, 2), ints([0, 2, 2, 0, 2]))),
    Case("at_add_zero_updates", lambda x, u, i: x.at[i].add(u),
         args(uniform(4, 3), uniform(0, 3), ints(np.zeros(0, np.int32))), argnums=(0, 1)),
    # scatter-sub
    Case("at_subtract_repeated", lambda x, u, i: x.at[i].subtract(u),
         args(uniform(4, 3), uniform(4, 3), REPEATED), argnums=(0, 1)),
    # scatter (overwrite)
    Case("at_set_distinct", lambda x, u, i: x.at[i].set(u),
         args(uniform(4, 3), uniform(2, 3), ints([3, 1])), argnums=(0, 1)),
    Case("at_set_unique_indices", lambda x, u, i: x.at[i].set(u, unique_indices=True),
         args(uniform(4, 3), uniform(2, 3), ints([3, 1])), argnums=(0, 1)),
    Case("at_set_repeated_last_wins", lambda x, u, i: x.at[i].set(u * u),
         args(uniform(4, 3), uniform(5, 3), ints([0, 2, 2, 0, 2])), argnums=(0, 1)),
    Case("at_set_out_of_bounds_dropped", lambda x, u, i: x.at[i].set(u),
         args(uniform(4, 3), uniform(4, 3), OUT_OF_BOUNDS), argnums=(0, 1)),
    Case("at_set_clip_mode", lambda x, u, i: x.at[i].set(u, mode="clip"),
         args(uniform(4, 3), uniform(4, 3), ints([0, 7, 3, 9])), argnums=(0, 1)),
    Case("at_set_scalar_element", lambda x, y: x.at[1, 2].set(y * y), args(uniform(3, 4), uniform()),
         argnums=(0, 1)),
    Case("at_set_from_self", lambda x: x.at[np.array([3, 0, 3])].set(x[:3] * 2.0),
         args(uniform(4, 2))),
    # scatter-mul
    Case("at_multiply_unique", lambda x, u, i: x.at[i].mul(u, unique_indices=True),
         args(uniform(4, 3), uniform(2, 3), ints([3, 1])), argnums=(0, 1)),
    Case("at_multiply_repeated_operand", lambda x, u, i: x.at[i].mul(u),
         args(uniform(4, 3), uniform(4, 3), REPEATED)),
    # scatter-max / scatter-min
    Case("at_max_repeated", lambda x, u, i: x.at[i].max(u),
         args(uniform(4, 3), uniform(4, 3), REPEATED), argnums=(0, 1)),
    Case("at_min_out_of_bounds_dropped", lambda x, u, i: x.at[i].min(u),
         args(uniform(4, 3), uniform(4, 3), OUT_OF_BOUNDS), argnums=(0, 1)),
    Case("segment_max", lambda d, s: jax.ops.segment_max(d, s, num_segments=3),
         args(uniform(5, 2), ints([0, 2, 2, 0, 2]))),
    Case("at_max_ties_shared", lambda x, u: x.at[np.array([1, 1, 0])].max(u),
         args(const(np.array([1.0, 2.0])), const(np.array([2.0, 2.0, 0.5]))), argnums=(0, 1), fd=False),
    # sort
    Case("sort_axis0", lambda x: jnp.sort(x, axis=0), args(uniform(4, 3))),
    Case("sort_last_axis_weighted", lambda x: jnp.sort(x) * jnp.arange(5.0, dtype=x.dtype)[None],
         args(uniform(2, 5))),
    Case("sort_ties", lambda x: jnp.sort(x, axis=1), args(TIES), fd=False),
    Case("sort_unstable", lambda x: lax.sort(x, is_stable=False), args(uniform(3, 4))),
    Case("sort_key_value", lambda k, v: lax.sort_key_val(k, v),
         args(uniform(6), uniform(6)), argnums=(0, 1)),
    Case("sort_two_keys_with_ties", lambda a, b, v: lax.sort((a, b, v), num_keys=2),
         args(const(np.array([1.0, 0.0, 1.0, 0.0, 1.0])), uniform(5), uniform(5)),
         argnums=(1, 2), fd=False),
    Case("median", lambda x: jnp.median(x, axis=1), args(uniform(3, 5))),
    Case("sort_zero_size", lambda x: jnp.sort(x, axis=1), args(uniform(3, 0))),
    # top_k
    Case("top_k", lambda x: lax.top_k(x, 2), args(uniform(3, 5))),
    Case("top_k_ties", lambda x: lax.top_k(x, 3)[0], args(TIES), fd=False),
    # approx_top_k (exact on CPU)
    Case("approx_max_k", lambda x: lax.approx_max_k(x, 2)[0], args(uniform(3, 5))),
    Case("approx_min_k_axis0", lambda x: lax.approx_min_k(x, 2, reduction_dimension=0),
         args(uniform(4, 3))),
]


@parametrize(CASES)
def test_slicing(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


def test_dynamic_slice_rule_casts_a_wider_cotangent_to_the_operand_dtype():
    """A float32 cotangent arriving at a bfloat16 dynamic_slice (as JAX 0.12 programs produced)
    is written into zeros of its own dtype, and the operand's cotangent is bfloat16."""
    rule = registry.vjp_rules[lax.dynamic_slice_p]
    x = jnp.arange(5, dtype=jnp.bfloat16)
    (ct_x, ct_i) = rule(jnp.ones(2, jnp.float32), x, jnp.int32(1), out=None, slice_sizes=(2,))
    assert ct_x.dtype == jnp.bfloat16 and ct_i is None
    np.testing.assert_array_equal(np.asarray(ct_x, np.float32), [0, 1, 1, 0, 0])

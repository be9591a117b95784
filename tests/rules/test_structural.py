"""Parity table for bpkit/rules/structural.py, row for row."""
import jax
import jax.numpy as jnp
from jax import lax

from jax._src.lax import lax as _lax_internal  # tie_p and tile: not exported everywhere
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import PartitionSpec as P

from bpkit.engine import compat
from tests.rules.harness import (COMPLEX, WITH_COMPLEX, Case, args, assert_case_parity, const, parametrize,
                                 real_arg, uniform)

# linear: complex64 by default, complex128 with finite differences under -m slow
LINEAR_COMPLEX = dict(dtypes=WITH_COMPLEX, slow_modes=("complex128-eager",))


def _tile(x, reps):
    """``lax.tile`` (the tile primitive on every supported JAX)."""
    return _lax_internal.tile(x, reps)

mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def _barrier(x, n, y):
    """optimization_barrier on a float, an integer and an unused float operand."""
    a, k, b = lax.optimization_barrier((x * 2, n, y))
    return a * k.astype(a.dtype) + jnp.sin(a)


CASES = [
    Case("broadcast_in_dim_new_axes", lambda x: lax.broadcast_in_dim(x, (2, 3, 4), (1,)),
         args(uniform(3)), **LINEAR_COMPLEX),
    Case("broadcast_in_dim_stretch_size1", lambda x: lax.broadcast_in_dim(x, (3, 4, 5), (0, 2)),
         args(uniform(1, 5))),
    Case("broadcast_in_dim_scalar", lambda x: lax.broadcast_in_dim(x, (2, 3), ()), args(uniform())),
    Case("expand_dims", lambda x: lax.expand_dims(x, (0, 2)), args(uniform(3, 4))),
    Case("reshape", lambda x: lax.reshape(x, (4, 3)), args(uniform(3, 4)), **LINEAR_COMPLEX),
    Case("reshape_with_dimensions", lambda x: lax.reshape(x, (12,), dimensions=(1, 0)),
         args(uniform(3, 4))),
    Case("squeeze", lambda x: lax.squeeze(x, (0, 2)), args(uniform(1, 3, 1, 4))),
    Case("transpose", lambda x: lax.transpose(x, (2, 0, 1)), args(uniform(2, 3, 4)),
         **LINEAR_COMPLEX),
    Case("rev", lambda x: lax.rev(x, (0, 2)), args(uniform(2, 3, 4))),
    Case("copy", lambda x: lax.copy_p.bind(x) * 2, args(uniform(3, 4))),
    Case("reduce_precision", lambda x: lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7),
         args(uniform(3, 4)), fd=False, rtol=1e-2),
    Case("convert_element_type_up_down",
         lambda x: lax.convert_element_type(lax.convert_element_type(x, jnp.float64), x.dtype) * 3,
         args(uniform(3, 4))),
    Case("convert_element_type_to_int_and_back",
         lambda x: x * lax.convert_element_type(lax.convert_element_type(x * 4, jnp.int32), x.dtype),
         args(uniform(3, 4, lo=0.1, hi=2.0)), fd=False),
    Case("convert_element_type_real_to_complex",
         lambda x: lax.convert_element_type(x, jnp.complex64 if x.dtype == jnp.float32
                                            else jnp.complex128) * (1 - 2j),
         args(real_arg(uniform(3, 4))), dtypes=COMPLEX),
    Case("concatenate", lambda x, y, z: lax.concatenate([x, y, z], 1),
         args(uniform(2, 3), uniform(2, 1), uniform(2, 4)), argnums=(0, 1, 2),
         **LINEAR_COMPLEX),
    Case("pad_edges_and_interior", lambda x, v: lax.pad(x, v, [(1, 2, 1), (0, 0, 0)]),
         args(uniform(3, 4), uniform()), argnums=(0, 1), **LINEAR_COMPLEX),
    Case("pad_negative", lambda x, v: lax.pad(x, v, [(-1, 2, 0), (2, -1, 1)]),
         args(uniform(4, 5), uniform()), argnums=(0, 1)),
    Case("pad_rank0", lambda x, v: lax.pad(x, v, []), args(uniform(), uniform()), argnums=(0, 1)),
    Case("pad_zero_size", lambda x, v: lax.pad(x, v, [(1, 2, 1), (0, 1, 0)]),
         args(uniform(0, 3), uniform()), argnums=(0, 1)),
    Case("split", lambda x: [p * (i + 1) for i, p in enumerate(jnp.split(x, [1, 3], axis=1))],
         args(uniform(2, 5))),
    Case("split_unused_piece", lambda x: jnp.split(x, [2], axis=0)[1], args(uniform(4, 3))),
    Case("unstack", lambda x: (lambda a, b, c: a * jnp.sin(b) + c)(*x), args(uniform(3, 4))),
    Case("unstack_unused_piece", lambda x: (lambda a, b, c: jnp.sin(b))(*x), args(uniform(3, 4))),
    # JAX 0.10 has the primitive but `a, b = x` does not emit it there: bind it directly.
    Case("unstack_axis1", lambda x: [p * (i + 1) for i, p in enumerate(
        compat.internal_primitive("unstack_p").bind(x, axis=1))], args(uniform(3, 4))),
    Case("device_put", lambda x: jax.device_put(x) * 2, args(uniform(3, 4))),
    Case("sharding_constraint",
         lambda x: lax.with_sharding_constraint(
             x * 2, jax.sharding.SingleDeviceSharding(jax.devices()[0])),
         args(uniform(3, 4))),
    # zero-size operands through the structural rules (JAX supports every one)
    Case("zero_size_broadcast_reshape_transpose_rev",
         lambda x: lax.rev(lax.transpose(lax.broadcast_in_dim(x, (2, 0, 3), (1, 2)), (2, 0, 1)),
                           (0,)).reshape(3, 0, 2),
         args(uniform(0, 3))),
    Case("zero_size_concatenate", lambda x, y: lax.concatenate([x, y, x], 0),
         args(uniform(0, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("zero_size_squeeze_expand_convert",
         lambda x: lax.convert_element_type(lax.expand_dims(lax.squeeze(x, (0,)), (1,)),
                                            jnp.float64),
         args(uniform(1, 0, 2))),
    # tile (JAX's testTileAutodiff shapes)
    Case("tile", lambda x: _tile(x, (2,)), args(uniform(3))),
    Case("tile_2d", lambda x: _tile(x, (1, 2)), args(uniform(2, 3))),
    Case("tile_size1_axes", lambda x: _tile(x, (1, 3, 1)), args(uniform(1, 1, 4))),
    Case("tile_zero_reps", lambda x: _tile(x, (0, 2)), args(uniform(2, 3))),
    # stack (its own primitive on JAX 0.10; concatenate of expand_dims later)
    Case("stack", lambda x, y, z: jnp.stack([x, y, z], axis=1), args(uniform(2, 3),
         uniform(2, 3), uniform(2, 3)), argnums=(0, 1, 2)),
    Case("stack_one_unused", lambda x, y: jnp.stack([x, y])[0], args(uniform(4), uniform(4)),
         argnums=(0, 1)),
    Case("optimization_barrier", _barrier, args(uniform(3), const(jnp.arange(3)), uniform(3)),
         argnums=(0, 2)),
    Case("checkpoint_name", lambda x: checkpoint_name(jnp.sin(x), "h") * x,
         args(uniform(3, 4))),
    Case("tie", lambda x, y: _lax_internal.tie_p.bind(x, jnp.sin(y)) * x, args(uniform(3),
         uniform(3)), argnums=(0, 1)),
    Case("layout_constraint",
         lambda x: with_layout_constraint(x * 2, Layout((0, 1))) ** 2, args(uniform(2, 3))),
    Case("reshard", lambda x: jnp.sin(jax.sharding.reshard(x * 2, P("x"))),
         args(uniform(8)), context=lambda: jax.set_mesh(mesh)),
]


@parametrize(CASES)
def test_structural(case, dtype, jit):
    assert_case_parity(case, dtype, jit)

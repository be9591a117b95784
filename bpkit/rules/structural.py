"""VJP rules of structural primitives: they move, copy or re-type values without arithmetic.

All of them are linear, so each rule is the transpose of the data movement: a broadcast sums
back, a transpose applies the inverse permutation, a concatenation slices its cotangent apart, a
tile sums its copies, a stack is sliced apart. Identities that only annotate a value
(``checkpoint_name``, ``optimization_barrier``, ``tie``, layout and sharding constraints,
``reshard``) pass the cotangent through (annotated the same way where that matters).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_vjp
from bpkit.rules.helpers import deflinear, instantiate_zeros, is_complex

P = lax


@register_vjp(P.broadcast_in_dim_p)
def _broadcast_in_dim_vjp(ct, x, *dyn_shape, out, shape, broadcast_dimensions, **params):
    """Sum over the new axes and over the size-1 axes that were stretched, then reshape."""
    x_shape = np.shape(x)
    stretched = [d for i, d in enumerate(broadcast_dimensions) if x_shape[i] == 1 and shape[d] != 1]
    new_axes = [d for d in range(len(shape)) if d not in broadcast_dimensions]
    summed = lax.reduce_sum(ct, tuple(sorted(new_axes + stretched))) if new_axes or stretched else ct
    return [lax.reshape(summed, x_shape), *[None] * len(dyn_shape)]


@register_vjp(P.reshape_p)
def _reshape_vjp(ct, x, *dyn, out, dimensions=None, **params):
    """Reshape back; with ``dimensions`` the forward transposed first, so transpose back after."""
    if dimensions is None:
        return [lax.reshape(ct, np.shape(x)), *[None] * len(dyn)]
    permuted = lax.reshape(ct, tuple(np.shape(x)[d] for d in dimensions))
    return [lax.transpose(permuted, tuple(np.argsort(dimensions))), *[None] * len(dyn)]


deflinear(P.squeeze_p, lambda ct, x, **p: [lax.reshape(ct, np.shape(x))])
deflinear(P.transpose_p,
          lambda ct, x, *, permutation: [lax.transpose(ct, tuple(np.argsort(permutation)))])
deflinear(P.rev_p, lambda ct, x, *, dimensions: [lax.rev(ct, dimensions)])
deflinear(P.copy_p, lambda ct, x: [ct])
deflinear(P.reduce_precision_p,
          lambda ct, x, *, exponent_bits, mantissa_bits: [
              lax.reduce_precision(ct, exponent_bits, mantissa_bits)])


@register_vjp(P.convert_element_type_p)
def _convert_element_type_vjp(ct, x, *, out, new_dtype, **params):
    """Cast the cotangent back to the operand's dtype; integer operands get none. A real operand
    converted to complex gets the real part (the transpose of embedding it in the plane)."""
    if not compat.is_inexact(compat.typeof(x)):
        return [None]
    if is_complex(ct) and not is_complex(x):
        ct = lax.real(ct)
    return [lax.convert_element_type(ct, compat.typeof(x).dtype)]


@register_vjp(P.concatenate_p)
def _concatenate_vjp(ct, *xs, out, dimension):
    """Slice the cotangent back into the operands' pieces along ``dimension``."""
    cts, start = [], 0
    for x in xs:
        size = np.shape(x)[dimension]
        cts.append(lax.slice_in_dim(ct, start, start + size, axis=dimension))
        start += size
    return cts


@register_vjp(P.pad_p)
def _pad_vjp(ct, x, padding_value, *, out, padding_config):
    """Undo the edge padding (a pad by the negated amounts), then keep every (interior+1)-th
    element; the padding value receives the total of everything else."""
    unpadded = lax.pad(ct, jnp.zeros((), ct.dtype),
                       [(-lo, -hi, 0) for lo, hi, _ in padding_config])
    ct_x = lax.slice(unpadded, (0,) * ct.ndim, unpadded.shape,
                     [interior + 1 for _, _, interior in padding_config])
    ct_pad = jnp.sum(ct) - jnp.sum(ct_x)
    return [ct_x, ct_pad.astype(ct.dtype)]


if hasattr(P, "split_p"):
    @register_vjp(P.split_p)
    def _split_vjp(cts, x, *, out, sizes, axis):
        """Concatenate the pieces' cotangents (zeros for pieces that received none)."""
        return [lax.concatenate([instantiate_zeros(c, o) for c, o in zip(cts, out)], axis)]


_unstack_p = compat.internal_primitive("unstack_p")  # JAX >= 0.11: `a, b = x` unstacks
if _unstack_p is not None:
    @register_vjp(_unstack_p)
    def _unstack_vjp(cts, x, *, out, axis):
        """Stack the pieces' cotangents back along ``axis`` (zeros for pieces that got none)."""
        pieces = [lax.expand_dims(instantiate_zeros(c, o), (axis,)) for c, o in zip(cts, out)]
        return [lax.concatenate(pieces, axis)]


@register_vjp(P.device_put_p)
def _device_put_vjp(cts, *xs, out, **params):
    return [instantiate_zeros(c, x) if compat.is_inexact(compat.typeof(x)) else None
            for c, x in zip(cts, xs)]


deflinear(P.sharding_constraint_p, lambda ct, x, **params: [ct])


_tile_p = compat.internal_primitive("tile_p")
if _tile_p is not None:
    @register_vjp(_tile_p)
    def _tile_vjp(ct, x, *, out, reps):
        """``out`` is ``reps[d]`` copies of ``x`` along each axis ``d``: view ``ct`` as
        ``(reps[0], n[0], reps[1], n[1], ...)`` and sum over the copies."""
        paired = tuple(k for r, n in zip(reps, np.shape(x)) for k in (r, n))
        return [lax.reduce_sum(lax.reshape(ct, paired), tuple(range(0, 2 * np.ndim(x), 2)))]


_stack_p = compat.internal_primitive("stack_p")
if _stack_p is not None:  # jnp.stack binds it on JAX 0.10
    @register_vjp(_stack_p)
    def _stack_vjp(ct, *xs, out, axis):
        """Operand ``i`` gets the slice ``i`` of ``ct`` along the new ``axis``."""
        return [lax.squeeze(lax.slice_in_dim(ct, i, i + 1, axis=axis), (axis,))
                for i in range(len(xs))]


@register_vjp(P.optimization_barrier_p)
def _optimization_barrier_vjp(cts, *xs, out):
    """The identity on many operands; the cotangents pass through a barrier of their own (with
    zeros for outputs that received none, as JAX does) so the backward keeps the ordering."""
    inexact = [i for i, x in enumerate(xs) if compat.is_inexact(compat.typeof(x))]
    passed = lax.optimization_barrier([instantiate_zeros(cts[i], out[i]) for i in inexact])
    result = [None] * len(xs)
    for i, ct in zip(inexact, passed):
        result[i] = ct
    return result


_name_p = compat.internal_primitive("name_p")  # jax.ad_checkpoint.checkpoint_name
deflinear(_name_p, lambda ct, x, *, name: [ct])  # the identity; the cotangent is not named

_tie_p = compat.internal_primitive("tie_p")
if _tie_p is not None:  # tie(x, y) returns y (x only orders the computation)
    deflinear(_tie_p, lambda ct, x, y: [None, ct])

_layout_constraint_p = compat.internal_primitive("layout_constraint_p")
if _layout_constraint_p is not None:  # the identity, with a memory layout for its result
    deflinear(_layout_constraint_p,
              lambda ct, x, **params: [_layout_constraint_p.bind(ct, **params)])

_reshard_p = compat.internal_primitive("reshard_p")
if _reshard_p is not None:  # jax.sharding.reshard: the identity, with a new sharding
    @register_vjp(_reshard_p)
    def _reshard_vjp(ct, x, *, out, dst_sharding, **params):
        """Reshard the cotangent back to the operand's sharding (the values are unchanged)."""
        return [_reshard_p.bind(ct, dst_sharding=compat.typeof(x).sharding, **params)]

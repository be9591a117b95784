"""VJP rules of reductions (sum, max, min, product) and cumulative reductions.

Conventions follow JAX: the cotangent of ``reduce_max``/``reduce_min`` is shared evenly between
all positions that attain the extremum; ``reduce_prod`` is exact when operands are zero (it
uses exclusive products instead of dividing by the operand).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import lax

from bpkit.engine.api import vjp
from bpkit.engine.registry import register_vjp

P = lax


def _expand(ct, x_shape, axes):
    """Broadcast a reduced cotangent back over the reduced ``axes`` of ``x_shape``."""
    kept = tuple(d for d in range(len(x_shape)) if d not in axes)
    return lax.broadcast_in_dim(ct, x_shape, kept)


@register_vjp(P.reduce_sum_p)
def _reduce_sum_vjp(ct, x, *, out, axes, **params):
    """Every summed element receives the cotangent of its sum."""
    return [_expand(ct, np.shape(x), axes)]


def _reduce_chooser_vjp(ct, x, *, out, axes, **params):
    """The cotangent goes to the positions equal to the result, split evenly between ties."""
    x_shape = np.shape(x)
    is_chosen = (x == _expand(out, x_shape, axes)).astype(ct.dtype)
    count = lax.reduce_sum(is_chosen, axes)
    return [is_chosen * _expand(ct / count, x_shape, axes)]


register_vjp(P.reduce_max_p, _reduce_chooser_vjp)
register_vjp(P.reduce_min_p, _reduce_chooser_vjp)


@register_vjp(P.reduce_prod_p)
def _reduce_prod_vjp(ct, x, *, out, axes, **params):
    """d(prod x)/dx_i = prod_{j != i} x_j, the product of the exclusive prefix and suffix."""
    x_shape = np.shape(x)
    kept = [d for d in range(len(x_shape)) if d not in axes]
    moved = lax.transpose(x, tuple(axes) + tuple(kept))  # (reduced..., kept...)
    n = int(np.prod([x_shape[a] for a in axes]))
    flat = lax.reshape(moved, (n,) + tuple(x_shape[d] for d in kept))
    ones = jnp.ones((1,) + flat.shape[1:], flat.dtype)
    prefix = jnp.concatenate([ones, lax.cumprod(flat, 0)[:-1]], 0)  # prod of x_j, j < i
    suffix = jnp.concatenate([lax.cumprod(flat, 0, reverse=True)[1:], ones], 0)  # j > i
    others = lax.reshape(prefix * suffix, moved.shape)
    grad = lax.transpose(others, tuple(np.argsort(tuple(axes) + tuple(kept))))
    return [grad * _expand(ct, x_shape, axes)]


@register_vjp(P.cumsum_p)
def _cumsum_vjp(ct, x, *, out, axis, reverse):
    """A running sum's transpose is the running sum taken the other way."""
    return [lax.cumsum(ct, axis, reverse=not reverse)]


def _associative_scan_vjp(combine):
    """Rule for a cumulative op: differentiate (with bpkit itself) the associative scan of
    ``combine`` that computes it, exactly as JAX defines the derivative of these primitives."""
    def rule(ct, x, *, out, axis, reverse):
        _, pullback = vjp(lambda y: lax.associative_scan(combine, y, reverse=reverse, axis=axis), x)
        return list(pullback(ct))
    return rule


register_vjp(P.cumprod_p, _associative_scan_vjp(lax.mul))
register_vjp(P.cummax_p, _associative_scan_vjp(lax.max))
register_vjp(P.cummin_p, _associative_scan_vjp(lax.min))
register_vjp(P.cumlogsumexp_p, _associative_scan_vjp(jnp.logaddexp))

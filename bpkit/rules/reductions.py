"""VJP rules of reductions (sum, max, min, product, a general ``lax.reduce``) and cumulative
reductions.

Conventions follow JAX: the cotangent of ``reduce_max``/``reduce_min`` is shared evenly between
all positions that attain the extremum; ``reduce_prod`` is exact when operands are zero (it
uses exclusive products instead of dividing by the operand).
"""
from __future__ import annotations

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

from bpkit.engine import compat, registry
from bpkit.engine.api import vjp
from bpkit.engine.core import vjp_jaxpr
from bpkit.engine.registry import register_fwd_bwd, register_vjp

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
    if np.size(x) == 0:  # nothing to differentiate (an empty product is the constant 1)
        return [jnp.zeros_like(x)]
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


# --- general reduce with a user-given computation (lax.reduce) ------------------------------
@register_fwd_bwd(P.reduce_p)
def _reduce_fwd_bwd(primals, active, *, computation, jaxpr, dimensions):
    """``lax.reduce(operands, inits, f, dims)`` with ``f`` not a plain sum/max/min/product
    (variadic reductions such as a max that carries its argmax along).

    JAX defines the derivative by the balanced tree of pairwise ``f`` calls that
    ``_reduce_tree`` builds (split the reduced axis in halves, pad an odd half with the
    initial values, combine, repeat); bpkit differentiates that same tree, with its own
    engine running through ``f``'s jaxpr, so ties resolve as in JAX. The initial values must
    not depend on the differentiated inputs (JAX refuses that case too). Integer operands
    (indices carried along) get no cotangent.
    """
    n = len(primals) // 2
    operands, inits = list(primals[:n]), list(primals[n:])
    if any(active[n:]):
        raise registry.UnsupportedPrimitiveError(
            "bpkit cannot differentiate lax.reduce with respect to its initial values (jax.grad "
            "refuses this too). Make the initial values constants (for example -inf for a "
            "max) and combine the data-dependent start with the result afterwards.")
    outs = P.reduce_p.bind(*primals, computation=computation, jaxpr=jaxpr,
                           dimensions=dimensions)
    body, body_consts = compat.open_jaxpr(jaxpr)

    def combine(*args):
        return compat.eval_jaxpr(body, body_consts, *args)

    def pullback(cts):
        tree = lambda *xs: _reduce_tree(combine, inits, xs, tuple(dimensions))  # noqa: E731
        tree_jaxpr, consts, _ = compat.make_jaxpr(tree, *operands)
        _, backward, _ = vjp_jaxpr(tree_jaxpr, consts, operands, active[:n])
        return [*backward(list(cts)), *[None] * n]

    return outs, pullback


def _reduce_tree(combine, inits, xs, axes):
    """``combine`` folded over ``axes`` of the operands ``xs`` as a balanced tree (JAX's
    derivative of ``reduce``): the reduced axes are moved to the front and flattened, then
    halved until one element is left."""
    shape = np.shape(xs[0])
    kept = tuple(d for d in range(len(shape)) if d not in axes)
    n = int(np.prod([shape[a] for a in axes]))
    xs = [lax.reshape(x, (n,) + tuple(shape[d] for d in kept), axes + kept) for x in xs]
    for _ in range(len(kept) + 1):  # combine works on scalars: map it over every axis
        combine = jax.vmap(combine)
    while np.shape(xs[0])[0] > 1:
        size = np.shape(xs[0])[0]
        half = (size + 1) // 2
        first = [lax.slice_in_dim(x, 0, half) for x in xs]
        second = [lax.slice_in_dim(x, half, size) for x in xs]
        if size - half != half:  # odd: the second half gets one initial value at its end
            pad = [(0, 1, 0)] + [(0, 0, 0)] * len(kept)
            second = [lax.pad(x, lax.convert_element_type(i, x.dtype), pad)
                      for x, i in zip(second, inits)]
        xs = combine(*first, *second)
    if np.shape(xs[0])[0] == 0:
        return [lax.full(tuple(shape[d] for d in kept), i) for i in inits]
    return [lax.squeeze(x, (0,)) for x in xs]

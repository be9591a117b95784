"""Helpers that make the common shapes of VJP rules one line (JAX's ``defjvp2``/``deflinear``).

* ``defunary(prim, pullback)``: ``pullback(ct, x, out) -> ct_x``.
* ``defbinary(prim, pull_x, pull_y)``: ``pull(ct, x, y, out)``, each summed back to its operand's
  shape by ``unbroadcast`` (jaxprs pass scalar literals to binary operations unbroadcast).
* ``deflinear(prim, transpose)``: a linear primitive; ``transpose(ct, *primals, **params)``
  returns the cotangents (the primals are there for their shapes only).
* ``defvjp_refusing(prim, rule, refused)``: a VJP rule for some operands only; differentiating
  one of the ``refused`` operands raises ``ValueError`` (where JAX raises too).
"""
from __future__ import annotations

import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_fwd_bwd, register_vjp


def unbroadcast(ct, x):
    """Sum ``ct`` down to the shape of ``x`` and cast it to ``x``'s dtype.

    Binary primitives in a jaxpr take operands of equal shape, a rank-0 operand next to an
    array (a scalar literal), or operands whose size-1 axes stretch (``sub a:f32[5,3]
    g:f32[1,1]``); the cotangent of the smaller operand sums over what was stretched.
    """
    shape, dtype = np.shape(x), _dtype(x)
    ct_shape = np.shape(ct)
    if ct_shape != shape:
        if len(shape) == 0:
            ct = lax.reduce_sum(ct, tuple(range(len(ct_shape))))
        elif len(shape) == len(ct_shape):
            stretched = tuple(i for i, (a, b) in enumerate(zip(shape, ct_shape)) if a == 1 != b)
            ct = lax.reshape(lax.reduce_sum(ct, stretched), shape)
        else:
            raise ValueError(f"cannot unbroadcast a cotangent of shape {ct_shape} to {shape}")
    return ct if ct.dtype == dtype else lax.convert_element_type(ct, dtype)


def _dtype(x):
    return getattr(x, "dtype", None) or np.result_type(x)


def is_complex(x) -> bool:
    """True for a complex array (its cotangent is complex too)."""
    return np.issubdtype(_dtype(x), np.complexfloating)


def zeros_like(x):
    """Zeros of ``x``'s shape and dtype (varying over the same mesh axes inside shard_map)."""
    return compat.match_varying(lax.full(np.shape(x), 0, _dtype(x)), x)


def instantiate_zeros(ct, like):
    """``ct``, or explicit zeros shaped like ``like`` when ``ct`` is a symbolic zero (``None``)."""
    return zeros_like(like) if ct is None else ct


def defunary(prim, pullback):
    """Register ``ct_x = pullback(ct, x, out)`` for a one-operand elementwise primitive."""
    def rule(ct, x, *, out, **params):
        return [pullback(ct, x, out)]
    rule.__name__ = f"{prim.name}_vjp"
    register_vjp(prim, rule)


def defbinary(prim, pull_x, pull_y):
    """Register ``ct_x = pull_x(ct, x, y, out)`` and ``ct_y = pull_y(...)`` for a binary primitive."""
    def rule(ct, x, y, *, out, **params):
        return [unbroadcast(pull_x(ct, x, y, out), x), unbroadcast(pull_y(ct, x, y, out), y)]
    rule.__name__ = f"{prim.name}_vjp"
    register_vjp(prim, rule)


def deflinear(prim, transpose):
    """Register a linear primitive by its transpose ``transpose(ct, *primals, **params)``."""
    def rule(ct, *primals, out, **params):
        return transpose(ct, *primals, **params)
    rule.__name__ = f"{prim.name}_vjp"
    register_vjp(prim, rule)


def defvjp_refusing(prim, rule, refused: dict):
    """Register the VJP ``rule(ct, *primals, out, **params)`` of ``prim``, except that
    differentiating operand ``i`` in ``refused`` raises ``ValueError(refused[i])`` when the
    forward pass reaches it, as JAX raises for a derivative it does not define."""
    def fwd_bwd(primals, active, **params):
        for i, why in refused.items():
            if active[i]:
                raise ValueError(why)
        out = prim.bind(*primals, **params)
        return [out], lambda ct: rule(ct, *primals, out=out, **params)
    fwd_bwd.__name__ = f"{prim.name}_fwd_bwd"
    register_fwd_bwd(prim, fwd_bwd)

"""A convolution with few taps whose training forward runs as shifted multiply-adds.

Channels last: ``x (B, *S, C)``, ``w (*K, C, O)``, ``y (B, *Q, O)``. With the input padded into
``xp`` and, for each kernel offset ``k`` (a tuple over the spatial axes), ``window_k(xp)`` the
strided slice of ``xp`` that offset reads (start ``k * dilation``, step ``stride``, ``Q`` long)::

    y = sum_{k, c} window_k(xp)[..., c] w[k, c, :]        (one broadcast multiply-add per tap)

Backward, with ``g = dL/dy``: the convolution's own cotangents (``bpkit.rules.conv``)::

    dx = conv(dilate(g, stride), rev(w))    (the kernel's in/out features swapped)
    dw = conv(x, g)                          (x's batch and feature axes swapped, g the kernel)

Saved: ``x`` and ``w`` (the inputs), as for the plain convolution.

Why: XLA's CPU backend (Eigen) runs a convolution as a product whose contraction is one
kernel window, ``prod(K) * C`` long; with one input channel and a 3x3 kernel that is 9, and the
product runs at 10 GFLOP/s (the 2-D CNN's first layer, ``(128, 28, 28, 1)`` to 16 channels:
2.6 ms). As ``prod(K) * C`` broadcast multiply-adds XLA fuses it into one elementwise loop:
0.26-0.30 ms. The cost of that loop grows with the number of taps; measured against the
convolution (forward + ``dw``, 2-core CPU, JAX 0.10.2, 3x3 and 5x5 kernels, 16-64 output
channels): 0.25-0.32x at 9 taps, 0.29-0.53x at 18, 0.39-0.67x at 25-27, 0.49-0.90x at 36-50,
1.05-1.47x (slower) at 72-75. Layers use this op up to
``MAX_SHIFTED_TAPS`` taps on CPU (``shifted_conv_is_faster``).

Without differentiation (an eval step, ``jax.jit(model.apply)``) the op is the plain
convolution: the custom_vjp's primal function is ``lax.conv_general_dilated`` and only its
forward rule (run by ``jax.grad`` and bpkit's engine alike) takes the shifted form. So a
function transformation that re-runs the primal (bpkit's per-example gradient norms) still sees
a convolution.
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from bpkit.engine import compat
from bpkit.ops import reference
from bpkit.rules.conv import lhs_cotangent, rhs_cotangent

# The most taps (kernel size times input channels) for which layers take the shifted form.
MAX_SHIFTED_TAPS = 27


def shifted_conv_is_faster(w_shape) -> bool:
    """Whether a kernel ``(*K, C, O)`` has at most ``MAX_SHIFTED_TAPS`` taps and JAX runs on
    CPU, where the shifted form was measured faster (other backends were not measured: they
    keep the convolution)."""
    return math.prod(w_shape[:-1]) <= MAX_SHIFTED_TAPS and compat.started_platform() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, dilation):
    return reference.conv(x, w, strides=strides, padding=pads, dilation=dilation)


def conv_forward(x, w, strides, pads, dilation):
    """``y`` as ``prod(K) * C`` broadcast multiply-adds (module docstring), accumulated in at
    least float32; saved ``(x, w)``."""
    nd = x.ndim - 2
    acc = x.dtype if jnp.finfo(x.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    xp = lax.pad(x.astype(acc), jnp.zeros((), acc), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
                 + [(0, 0, 0)])
    out_sizes = [(xp.shape[1 + i] - (w.shape[i] - 1) * dilation[i] - 1) // strides[i] + 1
                 for i in range(nd)]
    channels, lead = w.shape[-2], (1,) * (nd + 1)
    y = None
    for k in itertools.product(*(range(size) for size in w.shape[:nd])):
        start = [0] + [k[i] * dilation[i] for i in range(nd)] + [0]
        limit = ([x.shape[0]] + [start[1 + i] + (out_sizes[i] - 1) * strides[i] + 1
                                 for i in range(nd)] + [channels])
        window = lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,))  # (B, *Q, C)
        for c in range(channels):
            term = window[..., c:c + 1] * w[k + (c,)].astype(acc).reshape(lead + w.shape[-1:])
            y = term if y is None else y + term
    return y.astype(x.dtype), (x, w)


def conv_backward(strides, pads, dilation, saved, g):
    """``(dx, dw)``: the convolution's cotangents (``bpkit.rules.conv``)."""
    x, w = saved
    nd = x.ndim - 2
    conf = dict(window_strides=strides, padding=pads, lhs_dilation=(1,) * nd,
                rhs_dilation=dilation, dimension_numbers=reference.channels_last(nd),
                feature_group_count=1, batch_group_count=1, precision=None)
    return lhs_cotangent(g, x, w, **conf), rhs_cotangent(g, x, w, **conf)


_conv.defvjp(conv_forward, conv_backward)


def conv(x: jax.Array, w: jax.Array, *, strides=None, padding="SAME", dilation=None) -> jax.Array:
    """Convolution (cross-correlation), channels last, whose forward under differentiation
    runs as shifted multiply-adds (fast for few taps on CPU; module docstring).

    Args:
      x: ``(B, *S, C)``; w: ``(*K, C, O)``, of x's dtype.
      strides, dilation: one int per spatial axis (default 1); padding: ``"SAME"``,
        ``"VALID"`` or one ``(low, high)`` pair per spatial axis.
    Returns:
      ``(B, *Q, O)``, equal to ``lax.conv_general_dilated`` with these settings.
    """
    nd = x.ndim - 2
    if nd < 1 or w.ndim != nd + 2 or w.shape[-2] != x.shape[-1] or x.dtype != w.dtype:
        raise ValueError(f"conv: expected x (B, *spatial, C) and w (*kernel, C, O) of one dtype "
                         f"with as many spatial axes; got x {x.shape} {x.dtype} and w "
                         f"{w.shape} {w.dtype}.")
    strides = tuple(strides or (1,) * nd)
    dilation = tuple(dilation or (1,) * nd)
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(w.shape[:nd], dilation)]
        padding = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(x, w, strides, pads, dilation)

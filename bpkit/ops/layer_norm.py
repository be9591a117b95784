"""Fused layer normalisation over the last axis, with a hand-derived backward pass.

Forward (per row ``x`` of length ``d``; as llm.c's ``layernorm_forward``)::

    mean = (1/d) sum_i x_i
    rstd = 1 / sqrt((1/d) sum_i (x_i - mean)^2 + eps)
    xhat = (x - mean) * rstd
    y    = xhat * scale + bias

Backward (as llm.c's ``layernorm_backward``), with ``g = dL/dy``::

    (1) dbias  = sum over rows of g
    (2) dscale = sum over rows of g * xhat
    (3) dxhat  = g * scale
    (4) dx     = rstd * (dxhat - mean_i(dxhat) - xhat * mean_i(dxhat * xhat))

Term (4) follows from ``d xhat_j / d x_i = rstd (delta_ij - 1/d - xhat_i xhat_j / d)``. The
forward saves ``x`` and ``scale`` (inputs) and the per-row ``mean, rstd``. The backward never
forms ``xhat``. With ``xc = x - mean`` (so ``xhat = xc * rstd``) and ``gxc = g * xc``, both
reductions that involve ``xhat`` become matrix-vector products over one shared ``(..., d)``
array::

    (2) dscale = sum over rows of rstd * gxc          = rstd^T gxc      (rows contracted)
    (4) dx     = rstd * (dxhat - mean_i(dxhat) - xc * rstd^2 (gxc . scale) / d)

since ``mean_i(dxhat * xhat) = rstd (1/d) sum_i g_i scale_i xc_i``. Same math; on XLA's CPU
backend it reads and writes fewer ``(..., d)`` arrays than the formulas above (speed:
docs/benchmarks.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return layer_norm_forward(x, scale, bias, eps)[0]


def layer_norm_forward(x, scale, bias, eps):
    """``y`` and the saved values ``(x, scale, mean, rstd)``; mean and rstd are ``(..., 1)``."""
    lead = (1,) * (x.ndim - 1)
    mean = jnp.mean(x, axis=-1, keepdims=True)  # (..., 1)
    rstd = lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)  # (..., 1)
    y = (x - mean) * rstd * scale.reshape(lead + scale.shape) + bias.reshape(lead + bias.shape)
    return y, (x, scale, mean, rstd)


def layer_norm_backward(eps, saved, g):
    """``(dx, dscale, dbias)`` by terms (1)-(4) of the module docstring."""
    del eps
    x, scale, mean, rstd = saved
    lead = (1,) * (x.ndim - 1)
    rows = tuple(range(x.ndim - 1))
    xc = x - mean  # xhat = xc * rstd, never materialised
    gxc = g * xc
    dbias = jnp.sum(g, axis=rows)  # (1)
    # HIGHEST: these sums stay float32-exact where matrix units would round to bf16/tf32.
    # Rows flattened first: contracting (B, T) of a (B, T, d) array made XLA transpose gxc to
    # (d, B, T) (the GPT's train step 1.035x as long); (B T, d) is read as it lies.
    d = x.shape[-1]
    dscale = jnp.matmul(rstd.reshape(-1), gxc.reshape(-1, d), precision=HIGHEST)  # (2)
    dxhat = g * scale.reshape(lead + scale.shape)  # (3)
    row_mean = jnp.mean(dxhat, axis=-1, keepdims=True)  # (..., 1)
    proj = jnp.matmul(gxc, scale, precision=HIGHEST)[..., None]  # (..., 1): sum_i g_i s_i xc_i
    row_proj = proj * (rstd * rstd / d)
    dx = rstd * (dxhat - row_mean - xc * row_proj)  # (4)
    return dx, dscale, dbias


_layer_norm.defvjp(layer_norm_forward, layer_norm_backward)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Fused layer norm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Args:
      x: ``(..., d)``; scale, bias: ``(d,)``; all of one floating dtype.
    Returns:
      ``(..., d)``.
    """
    d = x.shape[-1]
    if scale.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"layer_norm: x has shape {x.shape}, so scale and bias must have shape "
                         f"({d},); got scale {scale.shape} and bias {bias.shape}.")
    return _layer_norm(x, scale, bias, float(eps))

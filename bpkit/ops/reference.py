"""Unfused references for the fused ops in ``bpkit.ops``: plain ``jax.numpy`` compositions.

Any reverse-mode engine (bpkit's or JAX's) differentiates these by the chain rule through
every intermediate; the fused ops must agree with them in value and in gradient. They avoid
``custom_jvp`` functions (``jax.nn.softmax``, ``logsumexp``) so that their backward pass is
built from elementary rules only. Layers select them with ``fused=False``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def log_softmax(logits: jax.Array) -> jax.Array:
    """``z - logsumexp(z)`` over the last axis, shifted by the (non-differentiated) row max."""
    shifted = logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def softmax(logits: jax.Array) -> jax.Array:
    """``exp(z) / sum(exp(z))`` over the last axis."""
    shifted = logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(shifted)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Per-example ``-sum_c q_c log softmax(z)_c`` with ``q = (1-a) onehot(y) + a/C``.

    logits ``(..., C)``, integer labels ``(...)`` -> losses ``(...)``.
    """
    num_classes = logits.shape[-1]
    target = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
    return -jnp.sum(target * log_softmax(logits), axis=-1)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis; x ``(..., d)``."""
    lead = (1,) * (x.ndim - 1)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    xhat = (x - mean) * lax.rsqrt(var + eps)
    return xhat * scale.reshape(lead + scale.shape) + bias.reshape(lead + bias.shape)


def causal_mask(q_len: int, k_len: int, query_offset: int = 0) -> jax.Array:
    """Boolean ``(1, 1, q_len, k_len)``: query ``i`` (at position ``query_offset + i``) may
    attend to key ``j`` iff ``j <= query_offset + i``."""
    rows = lax.broadcasted_iota(jnp.int32, (q_len, k_len), 0) + query_offset
    cols = lax.broadcasted_iota(jnp.int32, (q_len, k_len), 1)
    return (cols <= rows)[None, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
    """``softmax(q k^T / sqrt(D) [+ causal mask]) v`` per batch and head.

    q ``(B, Tq, H, D)``, k and v ``(B, Tk, H, D)`` -> ``(B, Tq, H, D)``, the layout of
    ``jax.nn.dot_product_attention``. The ``(B, H, Tq, Tk)`` probabilities are materialised
    (and, by reverse mode, saved for the backward pass).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, Tq, Tk)
    if causal:
        s = jnp.where(causal_mask(q.shape[1], k.shape[1]), s, -jnp.inf)
    p = softmax(s)  # (B, H, Tq, Tk)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)  # (B, Tq, H, D)


def channels_last(nd: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers of an ``nd``-d convolution, channels last: lhs ``(B, *S, C)``, rhs
    ``(*K, C, O)``, out ``(B, *Q, O)``."""
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers((0, nd + 1) + spatial, (nd + 1, nd) + tuple(range(nd)),
                                    (0, nd + 1) + spatial)


def conv(x: jax.Array, w: jax.Array, *, strides=None, padding="SAME", dilation=None) -> jax.Array:
    """``lax.conv_general_dilated``, channels last: x ``(B, *S, C)``, w ``(*K, C, O)`` ->
    ``(B, *Q, O)``."""
    nd = x.ndim - 2
    return lax.conv_general_dilated(x, w, tuple(strides or (1,) * nd), padding,
                                    rhs_dilation=tuple(dilation or (1,) * nd),
                                    dimension_numbers=channels_last(nd))

"""Fused scaled dot-product attention whose backward pass recomputes the probabilities.

Layout ``[batch, seq, heads, head_dim]`` as ``jax.nn.dot_product_attention``: q ``(B, Tq, H,
D)``, k and v ``(B, Tk, H, D)``. Per batch and head, with ``c = 1/sqrt(D)``:

Forward::

    S   = c q k^T                    (Tq, Tk), with -inf where the causal mask forbids (j > i)
    lse = log sum_j exp(S_ij)        (Tq,)  per-row log-sum-exp
    P   = exp(S - lse)               (Tq, Tk)
    O   = P v                        (Tq, D)

Backward, with ``dO = dL/dO``::

    (1) P   = exp(c q k^T - lse)     recomputed from the saved lse (no (Tq, Tk) matrix saved)
    (2) dv  = P^T dO
    (3) dP  = dO v^T
    (4) Dl_i = sum_d dO_id O_id      (= sum_j P_ij dP_ij, the softmax's row correction)
    (5) dS  = P * (dP - Dl)          (the softmax VJP: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik))
    (6) dq  = c dS k,   dk = c dS^T q

The forward saves ``q, k, v`` (inputs), ``out`` and the per-row ``lse`` ``(B, H, Tq)`` --
O(T) memory instead of the O(T^2) probabilities that reverse mode through the unfused
reference keeps. This is the FlashAttention backward, written without tiling.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bpkit.ops.reference import causal_mask


def _scores(q, k, causal):
    """``S = (q / sqrt(D)) k^T`` (scaled on the small side), -inf above the diagonal when
    causal: (B, H, Tq, Tk)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(q.shape[-1])), k)
    if causal:
        s = jnp.where(causal_mask(q.shape[1], k.shape[1]), s, -jnp.inf)
    return s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, causal):
    return attention_forward(q, k, v, causal)[0]


def attention_forward(q, k, v, causal):
    """``out`` and the saved values ``(q, k, v, out, lse)``."""
    s = _scores(q, k, causal)  # (B, H, Tq, Tk)
    m = jnp.max(s, axis=-1, keepdims=True)  # (B, H, Tq, 1); finite: the diagonal is unmasked
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)  # (B, H, Tq, 1)
    lse = m + jnp.log(denom)  # (B, H, Tq, 1)
    # Normalise after the product: (B, Tq, H, D) divisions instead of (B, H, Tq, Tk).
    out = jnp.einsum("bhqk,bkhd->bqhd", e, v) / jnp.swapaxes(denom, 1, 2)  # (B, Tq, H, D)
    return out, (q, k, v, out, lse)


def attention_backward(causal, saved, d_out):
    """``(dq, dk, dv)`` by steps (1)-(6) of the module docstring."""
    q, k, v, out, lse = saved
    c = 1.0 / math.sqrt(q.shape[-1])
    p = jnp.exp(_scores(q, k, causal) - lse)  # (1) (B, H, Tq, Tk)
    dv = jnp.einsum("bhqk,bqhd->bkhd", p, d_out)  # (2) (B, Tk, H, D)
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v)  # (3) (B, H, Tq, Tk)
    row = jnp.einsum("bqhd,bqhd->bhq", d_out, out)[..., None]  # (4) (B, H, Tq, 1)
    ds = p * (dp - row)  # (5)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k) * c  # (6) (B, Tq, H, D)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q) * c  # (6) (B, Tk, H, D)
    return dq, dk, dv


_attention.defvjp(attention_forward, attention_backward)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False) -> jax.Array:
    """Fused ``softmax(q k^T / sqrt(D) [masked]) v``; see the module docstring.

    Args:
      q: ``(B, Tq, H, D)``; k, v: ``(B, Tk, H, D)``.
      causal: query ``i`` attends only to keys ``j <= i`` (requires ``Tq == Tk``).
    Returns:
      ``(B, Tq, H, D)``.
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"attention: expected q (B, Tq, H, D) and k, v (B, Tk, H, D) of equal "
                         f"shape; got q {q.shape}, k {k.shape}, v {v.shape}.")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"attention: q {q.shape} and k {k.shape} must agree in batch, heads "
                         "and head_dim.")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: causal=True needs as many queries as keys; got Tq="
                         f"{q.shape[1]} and Tk={k.shape[1]}.")
    return _attention(q, k, v, bool(causal))

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
reference keeps. This is the FlashAttention backward.

Causal tiling. With the causal mask, the queries of rows ``[lo, hi)`` see only keys ``[0, hi)``.
Both passes therefore run over up to 4 query blocks of at least 64 rows (``query_blocks``),
each against its key prefix only: the masked upper triangle is not computed (4 blocks: 10/16
of the ``T x T`` work), and each key's ``dk, dv`` sums its blocks' contributions. Every row is
still normalised over all its keys, so the result equals the untiled formulas above. On a
2-core CPU this took the causal op's forward + backward to 0.68x of its untiled time at
(16, 128, 4, 32) and 0.90x at (8, 512, 8, 64) (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bpkit.ops.reference import causal_mask


def query_blocks(t: int, causal: bool) -> list[tuple[int, int]]:
    """Query row ranges ``[lo, hi)``; causal: up to 4 equal blocks of >= 64 rows (query block
    ``[lo, hi)`` reads keys ``[0, hi)``), else the one block ``[0, t)``."""
    n = max(1, min(4, t // 64)) if causal else 1
    while t % n:
        n -= 1
    size = t // n
    return [(i * size, (i + 1) * size) for i in range(n)]


def _scores(q, k, causal, query_offset=0):
    """``S = (q / sqrt(D)) k^T`` (scaled on the small side), -inf where key ``j`` comes after
    query ``query_offset + i`` when causal: (B, H, Tq, Tk)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / math.sqrt(q.shape[-1])), k)
    if causal:
        s = jnp.where(causal_mask(q.shape[1], k.shape[1], query_offset), s, -jnp.inf)
    return s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, causal):
    return attention_forward(q, k, v, causal)[0]


def attention_forward(q, k, v, causal):
    """``out`` and the saved values ``(q, k, v, out, lse)``."""
    outs, lses = [], []
    for lo, hi in query_blocks(q.shape[1], causal):
        keys = hi if causal else k.shape[1]  # the keys this block can see
        s = _scores(q[:, lo:hi], k[:, :keys], causal, lo)  # (B, H, hi - lo, keys)
        m = jnp.max(s, axis=-1, keepdims=True)  # finite: the diagonal is unmasked
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)  # (B, H, hi - lo, 1)
        lses.append(m + jnp.log(denom))
        # Normalise after the product: (B, Tq, H, D) divisions instead of (B, H, Tq, Tk).
        outs.append(jnp.einsum("bhqk,bkhd->bqhd", e, v[:, :keys]) / jnp.swapaxes(denom, 1, 2))
    out = jnp.concatenate(outs, axis=1)  # (B, Tq, H, D)
    lse = jnp.concatenate(lses, axis=2)  # (B, H, Tq, 1)
    return out, (q, k, v, out, lse)


def attention_backward(causal, saved, d_out):
    """``(dq, dk, dv)`` by steps (1)-(6) of the module docstring, block by block."""
    q, k, v, out, lse = saved
    c = 1.0 / math.sqrt(q.shape[-1])
    dq_blocks, dk_parts, dv_parts = [], [], []
    for lo, hi in query_blocks(q.shape[1], causal):
        keys = hi if causal else k.shape[1]
        q_b, k_b, v_b, d_out_b = q[:, lo:hi], k[:, :keys], v[:, :keys], d_out[:, lo:hi]
        p = jnp.exp(_scores(q_b, k_b, causal, lo) - lse[:, :, lo:hi])  # (1) (B, H, rows, keys)
        dv_b = jnp.einsum("bhqk,bqhd->bkhd", p, d_out_b)  # (2) (B, keys, H, D)
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out_b, v_b)  # (3)
        row = jnp.einsum("bqhd,bqhd->bhq", d_out_b, out[:, lo:hi])[..., None]  # (4)
        ds = p * (dp - row)  # (5)
        dq_blocks.append(jnp.einsum("bhqk,bkhd->bqhd", ds, k_b) * c)  # (6) (B, rows, H, D)
        dk_b = jnp.einsum("bhqk,bqhd->bkhd", ds, q_b) * c  # (6) (B, keys, H, D)
        tail = [(0, 0), (0, k.shape[1] - keys), (0, 0), (0, 0)]  # zero rows for unseen keys
        dk_parts.append(jnp.pad(dk_b, tail))
        dv_parts.append(jnp.pad(dv_b, tail))
    dk, dv = (functools.reduce(jnp.add, parts) for parts in (dk_parts, dv_parts))
    return jnp.concatenate(dq_blocks, axis=1), dk, dv


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

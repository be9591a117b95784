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

The forward saves ``q, k, v``, ``out`` and the per-row ``lse`` ``(B, H, Tq, 1)`` -- O(T)
memory instead of the O(T^2) probabilities that reverse mode through the unfused reference
keeps. This is the FlashAttention backward.

Layout. The products run heads-major, ``(B, H, T, D)``: q (already scaled by ``c``), k and v
are transposed once in the forward and saved that way, so every product is a batched matrix
product whose batch dimensions lead, and ``dk``, ``dv`` are formed transposed, as the
``(D, Tk)`` products ``q^T dS`` and ``dO^T P`` (from ``(B, H, D, T)`` copies of q and dO), so
that no ``(Tq, Tk)`` matrix is transposed.
(Written on the ``[B, T, H, D]`` layout, XLA transposed operands for every product.)

Causal tiling. With the causal mask, the queries of rows ``[lo, hi)`` see only keys ``[0, hi)``.
Both passes therefore run over up to 4 query blocks of at least 32 rows (``query_blocks``),
each against its key prefix only: the masked upper triangle is not computed (4 blocks: 10/16
of the ``T x T`` work), and each key's ``dk, dv`` sums the contributions of the blocks that
saw it (key chunk ``j`` = rows of block ``j``: blocks ``j, j+1, ...``). Every row is
still normalised over all its keys, so the result equals the untiled formulas above.
Measured speed: docs/benchmarks.md.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bpkit.ops.reference import causal_mask


def query_blocks(t: int, causal: bool) -> list[tuple[int, int]]:
    """Query row ranges ``[lo, hi)``; causal: up to 4 equal blocks of >= 32 rows (query block
    ``[lo, hi)`` reads keys ``[0, hi)``), else the one block ``[0, t)``."""
    n = max(1, min(4, t // 32)) if causal else 1
    while t % n:
        n -= 1
    size = t // n
    return [(i * size, (i + 1) * size) for i in range(n)]


def _heads_major(x):
    """``(B, T, H, D) -> (B, H, T, D)`` (and back: the permutation is its own inverse)."""
    return jnp.transpose(x, (0, 2, 1, 3))


def _scores(q_t, k_t, causal, query_offset=0):
    """``S = q_t k_t^T`` for heads-major, pre-scaled ``q_t``, with -inf where key ``j`` comes
    after query ``query_offset + i`` when causal: (B, H, Tq, Tk)."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q_t, k_t)
    if causal:
        s = jnp.where(causal_mask(q_t.shape[2], k_t.shape[2], query_offset), s, -jnp.inf)
    return s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, causal):
    return attention_forward(q, k, v, causal)[0]


def attention_forward(q, k, v, causal):
    """``out`` and the saved values ``(q_t, k_t, v_t, out, lse)``: the inputs heads-major
    ``(B, H, T, D)``, q scaled by ``c``; ``lse`` ``(B, H, Tq, 1)``."""
    q_t, k_t, v_t = _heads_major(q * (1.0 / math.sqrt(q.shape[-1]))), _heads_major(k), \
        _heads_major(v)
    outs, lses = [], []
    for lo, hi in query_blocks(q.shape[1], causal):
        keys = hi if causal else k.shape[1]  # the keys this block can see
        s = _scores(q_t[:, :, lo:hi], k_t[:, :, :keys], causal, lo)  # (B, H, hi - lo, keys)
        m = jnp.max(s, axis=-1, keepdims=True)  # finite: the diagonal is unmasked
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)  # (B, H, hi - lo, 1)
        lses.append(m + jnp.log(denom))
        # Normalise after the product: (Tq, D) divisions instead of (Tq, Tk).
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", e, v_t[:, :, :keys]) / denom)
    out = _heads_major(jnp.concatenate(outs, axis=2))  # (B, Tq, H, D)
    return out, (q_t, k_t, v_t, out, jnp.concatenate(lses, axis=2))


def attention_backward(causal, saved, d_out):
    """``(dq, dk, dv)`` by steps (1)-(6) of the module docstring, block by block."""
    q_t, k_t, v_t, out, lse = saved
    c = 1.0 / math.sqrt(q_t.shape[-1])
    row_all = jnp.einsum("bqhd,bqhd->bhq", d_out, out)[..., None]  # (4) (B, H, Tq, 1)
    d_out_t = _heads_major(d_out)
    # (B, H, D, T) copies of q and dO (small), so dk^T and dv^T are plain (D, Tq) (Tq, Tk)
    # products too.
    q_dt, d_out_dt = jnp.swapaxes(q_t, 2, 3), jnp.swapaxes(d_out_t, 2, 3)
    blocks = query_blocks(q_t.shape[2], causal)
    dq_blocks, dk_parts, dv_parts = [], [], []
    for lo, hi in blocks:
        keys = hi if causal else k_t.shape[2]
        q_b, k_b, v_b = q_t[:, :, lo:hi], k_t[:, :, :keys], v_t[:, :, :keys]
        d_out_b, row = d_out_t[:, :, lo:hi], row_all[:, :, lo:hi]
        q_db, d_out_db = q_dt[..., lo:hi], d_out_dt[..., lo:hi]
        p = jnp.exp(_scores(q_b, k_b, causal, lo) - lse[:, :, lo:hi])  # (1) (B, H, rows, keys)
        # dv^T and dk^T as (D, keys) products: their operands need no (rows, keys) transpose.
        dv_parts.append(jnp.einsum("bhdq,bhqk->bhdk", d_out_db, p))  # (2)
        dp = jnp.einsum("bhqd,bhkd->bhqk", d_out_b, v_b)  # (3)
        ds = p * (dp - row)  # (5)
        dq_blocks.append(jnp.einsum("bhqk,bhkd->bhqd", ds, k_b))  # (6) without its c
        dk_parts.append(jnp.einsum("bhdq,bhqk->bhdk", q_db, ds))  # (6) q_db carries the c

    def by_key_chunk(parts):  # (B, H, D, keys) parts -> (B, H, D, Tk)
        if not causal:
            return parts[0]
        # Key chunk j (the rows of query block j) is seen by query blocks j, j+1, ...: sum
        # their slices, chunk by chunk. (Padding each part to Tk and adding them all made XLA
        # run one pad per part, and took the GPT's train step 1.05x as long.)
        return jnp.concatenate([functools.reduce(jnp.add, (p[..., lo:hi] for p in parts[j:]))
                                for j, (lo, hi) in enumerate(blocks)], axis=3)

    dk_t, dv_t = by_key_chunk(dk_parts), by_key_chunk(dv_parts)
    dq = _heads_major(jnp.concatenate(dq_blocks, axis=2) * c)
    return dq, jnp.transpose(dk_t, (0, 3, 1, 2)), jnp.transpose(dv_t, (0, 3, 1, 2))


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

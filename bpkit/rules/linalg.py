"""The VJP rules of ``dot_general`` (matrix products with any contraction and batch dimensions)
and of ``ragged_dot_general`` (grouped matrix products, at the end of this module).

For ``out[b, f_l, f_r] = sum_c lhs[b, f_l, c] * rhs[b, c, f_r]`` (axes in any positions):

* ``ct_lhs[b, f_l, c] = sum_{f_r} ct[b, f_l, f_r] * rhs[b, c, f_r]``
* ``ct_rhs[b, c, f_r] = sum_{f_l} ct[b, f_l, f_r] * lhs[b, f_l, c]``

Each is itself one ``dot_general`` followed by a transpose back to the operand's axis order; the
rhs rule is the lhs rule with the operands' roles swapped. Complex operands need no conjugate
(JAX's VJP is the transpose); a real operand of a complex product gets the real part.

A dense layer's weight gradient ``x^T g`` contracts the leading (batch) axis of both operands.
XLA's CPU backend runs that form in Eigen, and its library products (YNNPACK) only take the plain
form; for small operands the explicit transpose then a plain product is faster
(``_small_transposed_product``).
"""
from __future__ import annotations

import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_vjp
from bpkit.rules.helpers import is_complex


def _ct_operand(ct, other, ndim, dims, other_dims, ct_free, ct_other_free, precision):
    """Cotangent of one operand (``ndim`` axes; its contracting/batch axes ``dims``) given the
    other operand. ``ct_free`` are the axes of ``ct`` that belong to this operand's free axes,
    ``ct_other_free`` those of the other operand's free axes."""
    (contract, batch), (other_contract, other_batch) = dims, other_dims
    other_free = [d for d in range(np.ndim(other)) if d not in other_contract and d not in other_batch]
    n_batch = len(batch)
    ct_batch = tuple(range(n_batch))
    ct_c, other_c = tuple(ct_other_free), tuple(other_free)
    if not n_batch:
        ct, ct_c, other, other_c = _merge_contraction(ct, ct_c, other, other_c)
        if ndim == 2 and np.ndim(ct) == np.ndim(other) == 2 and ct_c == other_c == (0,):
            # ct (N, F) and other (N, C): this operand is (C, F) or (F, C); contract over N.
            first, second = (other, ct) if tuple(contract) == (0,) else (ct, other)
            res = _small_transposed_product(first, second, precision)
            if res is not None:
                return res
    res = lax.dot_general(ct, other, ((ct_c, other_c), (ct_batch, tuple(other_batch))),
                          precision=precision, preferred_element_type=other.dtype)
    # res axes: batch (in batch order), this operand's free axes (sorted), then the other
    # operand's remaining axes, i.e. its contracting axes in increasing order.
    free = [d for d in range(ndim) if d not in contract and d not in batch]
    order = np.argsort(other_contract)
    src = list(batch) + free + [contract[k] for k in order]
    return lax.transpose(res, tuple(np.argsort(src)))


# The largest operand that ``_small_transposed_product`` transposes (measured below).
SMALL_TRANSPOSE_BYTES = 2 ** 19


def _small_transposed_product(a, b, precision):
    """``a^T b`` for ``a (N, K)`` and ``b (N, M)`` as plain products on CPU: ``transpose(a) @
    b``, or ``transpose(transpose(b) @ a)`` where copying ``b`` and the ``(M, K)`` result moves
    fewer elements (a classifier head's weight gradient: ``M`` = 10); ``None`` (the caller
    contracts the leading axes in one ``dot_general``) off CPU, for an outer product (``N`` = 1,
    as in ``vmap`` of a one-example gradient: there the copies made ``vmap(bpkit.grad)``'s
    per-example norms of the MLP 1.85x slower) or when the copied operand is larger than
    ``SMALL_TRANSPOSE_BYTES``.

    XLA's CPU backend runs a product that contracts both operands' leading axes in Eigen (it
    folds an explicit transpose back into the product, hence the optimization barriers), and a
    plain ``(K, N) @ (N, M)`` product in YNNPACK. Measured (2-core CPU, the whole train step,
    interleaved): GRU 0.92-0.95x on JAX 0.10.2, 0.11.2 and 0.12; residual MLP (``512x64``
    weight gradients) 0.90-0.99x and MLP (``512x40``, ``512x256``) 0.93-0.98x on 0.10.2, both
    0.97-1.01x on 0.11.2 and 0.12; isolated, ``512x64^T 512x64`` 66 -> 49 us; copying the head's
    ``(512, 10)`` cotangent instead of its ``(512, 256)`` input: MLP a further 0.95-0.98x,
    residual MLP 0.97-0.98x (0.10.2). The copy costs more than it saves from
    ``2048x128`` up (1 MiB; the GPT's weight gradients: the step 1.19x with them transposed).
    Other backends fold the transpose into their GEMM, so the plain ``dot_general`` stays there.
    """
    (n, k), m = a.shape, b.shape[1]
    # n == 1 is an outer product (one example under vmap), which XLA runs as a multiply.
    if n == 1 or compat.started_platform() != "cpu":
        return None
    copy_b = n * m + m * k < n * k
    copied = b if copy_b else a
    if np.size(copied) * np.dtype(copied.dtype).itemsize > SMALL_TRANSPOSE_BYTES:
        return None

    def product(x, y):  # (N, P)^T (N, Q) -> (P, Q) as a plain product of a barriered copy
        x_t = lax.optimization_barrier(lax.transpose(x, (1, 0)))
        return lax.dot_general(x_t, y, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=b.dtype)
    if copy_b:
        return lax.transpose(lax.optimization_barrier(product(b, a)), (1, 0))
    return product(a, b)


def _merge_contraction(a, a_dims, b, b_dims):
    """Contract over one flattened axis instead of several adjacent ones.

    ``x (B, T, d)`` against ``ct (B, T, e)`` over ``(B, T)`` is the same product as
    ``x (B*T, d)`` against ``ct (B*T, e)`` over ``B*T``; CPU and GPU backends run the 2-D form
    as one plain matrix multiplication instead of transposing and copying first.
    """
    def adjacent(dims):
        return len(dims) > 1 and list(dims) == list(range(dims[0], dims[0] + len(dims)))
    if not (adjacent(a_dims) and adjacent(b_dims)):
        return a, a_dims, b, b_dims

    def merge(x, dims):
        lo, hi = dims[0], dims[-1] + 1
        shape = np.shape(x)
        return lax.reshape(x, shape[:lo] + (int(np.prod(shape[lo:hi])),) + shape[hi:]), (lo,)
    a, a_dims = merge(a, a_dims)
    b, b_dims = merge(b, b_dims)
    return a, a_dims, b, b_dims


@register_vjp(lax.dot_general_p)
def _dot_general_vjp(ct, lhs, rhs, *, out, dimension_numbers, precision=None,
                     preferred_element_type=None, **params):
    (lc, rc), (lb, rb) = dimension_numbers
    nb = len(lb)
    n_lfree = np.ndim(lhs) - len(lc) - nb
    ct_lfree = list(range(nb, nb + n_lfree))
    ct_rfree = list(range(nb + n_lfree, np.ndim(ct)))
    cts = []
    for x, other, dims, odims, mine, theirs in (
            (lhs, rhs, (lc, lb), (rc, rb), ct_lfree, ct_rfree),
            (rhs, lhs, (rc, rb), (lc, lb), ct_rfree, ct_lfree)):
        if not compat.is_inexact(compat.typeof(x)):
            cts.append(None)
            continue
        # A real operand of a complex product: compute in complex, keep the real part (the
        # transpose of embedding a real number in the complex plane).
        real_of_complex = is_complex(ct) and not is_complex(x)
        work = np.promote_types(x.dtype, ct.dtype) if real_of_complex else x.dtype
        c = _ct_operand(ct.astype(work), other.astype(work), np.ndim(x), dims, odims,
                        mine, theirs, precision)
        cts.append(lax.real(c).astype(x.dtype) if c.dtype != x.dtype else c)
    return cts


# --- ragged_dot_general (grouped matmuls: mixture-of-experts layers) ----------------------------
_ragged_dot_general_p = compat.internal_primitive("ragged_dot_general_p")


@register_vjp(_ragged_dot_general_p)
def _ragged_dot_general_vjp(ct, lhs, rhs, group_sizes, *, out, ragged_dot_dimension_numbers,
                            precision=None, preferred_element_type=None, group_offset=None,
                            **params):
    """``lax.ragged_dot``: row block ``i`` of ``lhs`` (``group_sizes[i]`` rows along its ragged,
    non-contracting axis ``m``) is multiplied by group ``i`` of ``rhs``:
    ``out[b, m, n] = sum_k lhs[b, m, k] * rhs[b, group(m), k, n]``.

    * ``ct_lhs[b, m, k] = sum_n ct[b, m, n] * rhs[b, group(m), k, n]``: the same ragged product
      of ``ct`` with ``rhs``, contracting the ``n`` axes;
    * ``ct_rhs[g, b, k, n] = sum_{m in group g} lhs[b, m, k] * ct[b, m, n]``: a ragged product
      that contracts the ragged axis ``m`` group by group (output axis ``g`` first).

    Each result is transposed back to its operand's axis order. As in JAX, only a ragged
    non-contracting axis (the grouped-matmul case) and no ``group_offset`` are differentiable.
    """
    dn = ragged_dot_dimension_numbers
    (l_contract, r_contract), (l_batch, r_batch) = dn.dot_dimension_numbers
    (ragged,), r_group = dn.lhs_ragged_dimensions, tuple(dn.rhs_group_dimensions)
    if group_offset is not None or ragged in l_contract or ragged in l_batch:
        raise NotImplementedError(
            "bpkit differentiates ragged_dot_general only when its ragged axis is a "
            "non-contracting lhs axis and group_offset is None (the case jax.grad supports).")
    l_kept = [d for d in range(np.ndim(lhs)) if d not in l_contract and d not in l_batch]
    r_kept = [d for d in range(np.ndim(rhs))
              if d not in r_contract and d not in r_batch and d not in r_group]
    nb, nl = len(l_batch), len(l_kept)
    ct_batch = tuple(range(nb))
    ct_l = tuple(range(nb, nb + nl))
    ct_r = tuple(range(nb + nl, nb + nl + len(r_kept)))
    cts = [None, None, None]
    if compat.is_inexact(compat.typeof(lhs)):
        dims = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=((ct_r, tuple(r_kept)), (ct_batch, tuple(r_batch))),
            lhs_ragged_dimensions=[nb + l_kept.index(ragged)], rhs_group_dimensions=list(r_group))
        res = lax.ragged_dot_general(ct.astype(lhs.dtype), rhs.astype(lhs.dtype), group_sizes,
                                     dims, precision=precision)
        # res axes: batch, lhs kept, then rhs's free axes = lhs contracting (in rhs order)
        src = list(l_batch) + l_kept + list(np.take(l_contract, np.argsort(r_contract)))
        cts[0] = lax.transpose(res, tuple(np.argsort(src)))
    if compat.is_inexact(compat.typeof(rhs)):
        dims = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=((tuple(l_kept), ct_l), (tuple(l_batch), ct_batch)),
            lhs_ragged_dimensions=[ragged], rhs_group_dimensions=[])
        res = lax.ragged_dot_general(lhs.astype(rhs.dtype), ct.astype(rhs.dtype), group_sizes,
                                     dims, precision=precision)
        # res axes: group, batch, lhs free = rhs contracting (in lhs order), ct free = rhs kept
        src = (list(r_group) + list(r_batch) + list(np.take(r_contract, np.argsort(l_contract)))
               + r_kept)
        cts[1] = lax.transpose(res, tuple(np.argsort(src)))
    return cts

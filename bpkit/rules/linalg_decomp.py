"""VJP rules of the matrix factorizations and solves: what ``jnp.linalg``/``jax.scipy.linalg`` bind.

Every rule is the transpose of JAX's own forward-mode derivative (same formulas, same
conventions at undefined points), written out by hand; two go further than JAX:
``householder_product`` (JAX has no derivative) and pivoted QR of wide matrices (JAX's is
wrong) and of batches (JAX raises). Matrices are the last two axes of
``[..., m, n]`` arrays (leading batch axes are carried through). Complex inputs follow JAX's
convention: a rule returns the *transpose* of the linear map ``dA -> dOut`` with respect to the
real pairing ``<x, y> = Re sum(x * y)`` (so a ``conj`` in the derivative becomes a ``conj`` of the
cotangent, and ``A^H`` appears where the math has the conjugate transpose). Notation below:
``X^T`` swaps the last two axes, ``X^H = conj(X)^T``, ``Ḡ`` is the output cotangent.

=============================  ===============================================================
primitive                      what flows back
=============================  ===============================================================
cholesky                       Murray (2016): ``L^-T Φ(L^T Ḡ) conj(L)^-1``
triangular_solve               ``ct_b`` = the solve with ``op(A)^T``; ``ct_a`` = ``-ct_b X^T``
lu (+ pivots_to_permutation)   De Hoog, Anderssen & Lukas: two triangular solves
qr                             Towns' thin-QR derivative (+ wide and full-matrices cases)
householder_product            the explicit product of reflectors, through bpkit's engine
eigh                           Giles (2008) / Seeger: ``conj(V) (F∘(V^T Ḡv) + diag(Ḡw)) V^T``
svd                            Giles / Seeger (Townsend's formulas, as JAX)
custom_linear_solve            implicit differentiation with the user's ``transpose_solve``
=============================  ===============================================================

All rules are built from ``jax.lax``/``jnp`` operations (including triangular solves and
``jnp.linalg.solve``, whose primitives have rules here), so bpkit can differentiate them again.
"""
from __future__ import annotations

import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.core import vjp_jaxpr
from bpkit.engine.registry import register_fwd_bwd, register_nondiff, register_vjp
from bpkit.rules.helpers import instantiate_zeros

_HIGHEST = lax.Precision.HIGHEST  # as JAX's own linalg derivatives


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _T(x):
    return jnp.swapaxes(x, -1, -2)


def _H(x):
    return jnp.conj(_T(x))


def _eye(n: int, like, cols: int | None = None):
    """An identity ``[1, ..., 1, n, cols]`` with as many axes as ``like`` and its dtype."""
    eye = np.eye(n, n if cols is None else cols, dtype=like.dtype)
    return jnp.asarray(eye.reshape((1,) * (like.ndim - 2) + eye.shape))


def _diag_embed(d):
    """``[..., k] -> [..., k, k]`` diagonal matrices."""
    return d[..., None, :] * _eye(d.shape[-1], d[..., None, :])


def _solve_tri(a, b, *, left_side, lower, transpose_a=False, conjugate_a=False,
               unit_diagonal=False):
    return lax.linalg.triangular_solve(a, b, left_side=left_side, lower=lower,
                                       transpose_a=transpose_a, conjugate_a=conjugate_a,
                                       unit_diagonal=unit_diagonal)


def _unpermute(ct, perm, axis):
    """The transpose of ``x -> take(x, perm, axis)`` for a permutation ``perm [..., n]``:
    ``ct`` taken at the inverse permutation."""
    inverse = jnp.argsort(perm, axis=-1)
    idx = inverse[..., :, None] if axis == -2 else inverse[..., None, :]
    return jnp.take_along_axis(ct, idx, axis=axis)


# --- cholesky -----------------------------------------------------------------------------------
def _cholesky_lower_triangle_transpose(c):
    """Transpose of ``S(Σ) = tril(Σ) + tril(Σ, -1)^H`` (diagonal made real), the Hermitian
    matrix built from the lower triangle that JAX >= 0.11 feeds its Cholesky derivative:
    ``tril(C, -1) + tril(C^H, -1) + diag(Re C)``."""
    diag = _eye(c.shape[-1], c) * jnp.real(c).astype(c.dtype)
    return jnp.tril(c, -1) + jnp.tril(_H(c), -1) + diag


@register_vjp(prims.cholesky_p)
def _cholesky_vjp(ct, x, *, out, **params):
    """``Σ = L L^H`` (``L`` lower triangular; the primitive reads only ``Σ``'s lower triangle).

    Forward (Murray 2016): ``dL = L Φ(L^-1 dΣ L^-H)``, ``Φ`` = lower triangle with the diagonal
    halved. Transposed: ``ct_Σ = L^-T Φ(L^T Ḡ) conj(L)^-1``, two triangular solves. JAX up to
    0.10 applies this to the whole tangent ``dΣ``, so the cotangent is not symmetric; from 0.11
    JAX first builds the Hermitian tangent from ``dΣ``'s lower triangle, so only the lower
    triangle gets a cotangent (``compat.CHOLESKY_TANGENT_FROM_LOWER``). Through
    ``jnp.linalg.cholesky`` (which symmetrizes its input) both give the same gradient.
    Undefined where ``Σ`` is not positive definite (``L`` is NaN there, and so is the result).
    """
    L = jnp.tril(out)
    n = L.shape[-1]
    phi = jnp.tril(_mm(_T(L), ct)) / (1 + _eye(n, L))
    left = _solve_tri(L, phi, left_side=True, lower=True, transpose_a=True)
    ct_x = _solve_tri(L, left, left_side=False, lower=True, conjugate_a=True)
    if compat.CHOLESKY_TANGENT_FROM_LOWER:
        ct_x = _cholesky_lower_triangle_transpose(ct_x)
    return [ct_x]


# --- triangular_solve ---------------------------------------------------------------------------
@register_vjp(prims.triangular_solve_p)
def _triangular_solve_vjp(ct, a, b, *, out, left_side, lower, transpose_a, conjugate_a,
                          unit_diagonal):
    """``X = op(A)^-1 B`` (``left_side``) or ``X = B op(A)^-1``, ``op`` = transpose and/or
    conjugate as the parameters say; only ``A``'s ``lower``/upper triangle is read (without
    its diagonal when ``unit_diagonal``).

    ``ct_B = op(A)^-T Ḡ`` (left) or ``Ḡ op(A)^-T`` (right): the same solve with
    ``transpose_a`` flipped. ``dX = -op(A)^-1 op(dA) X`` (left) or ``-X op(dA) op(A)^-1``, so
    ``ct_op(A) = -ct_B X^T`` (left) or ``-X^T ct_B``; undoing ``op`` and keeping the triangle
    that was read gives ``ct_A``. Undefined where ``A`` is singular (a zero on the diagonal).
    """
    ct_b = _solve_tri(a, ct, left_side=left_side, lower=lower, transpose_a=not transpose_a,
                      conjugate_a=conjugate_a, unit_diagonal=unit_diagonal)
    ct_op_a = -(_mm(ct_b, _T(out)) if left_side else _mm(_T(out), ct_b))
    ct_a = _T(ct_op_a) if transpose_a else ct_op_a
    ct_a = jnp.conj(ct_a) if conjugate_a else ct_a
    k = 1 if unit_diagonal else 0
    ct_a = jnp.tril(ct_a, -k) if lower else jnp.triu(ct_a, k)
    return [ct_a, ct_b]


# --- lu -----------------------------------------------------------------------------------------
def _lu_factors(lu):
    """Unit-lower ``L [..., m, m]`` and upper ``U [..., n, n]`` from LAPACK's packed ``[..., m, n]``
    ``lu``, each padded with the identity to a square matrix (as JAX's derivative does)."""
    m, n = lu.shape[-2:]
    k = min(m, n)
    batch = [(0, 0)] * (lu.ndim - 2)
    l = jnp.pad(jnp.tril(lu[..., :, :k], -1), batch + [(0, 0), (0, m - k)]) + _eye(m, lu)
    u_eye = np.diag(np.arange(n) >= k).astype(lu.dtype).reshape((1,) * (lu.ndim - 2) + (n, n))
    u = jnp.pad(jnp.triu(lu[..., :k, :]), batch + [(0, n - k), (0, 0)]) + u_eye
    return l, u


@register_vjp(prims.lu_p)
def _lu_vjp(cts, a, *, out, **params):
    """``P A = L U`` with partial pivoting; outputs ``(lu, pivots, permutation)``, the last two
    integer (no cotangent).

    Forward (De Hoog, Anderssen & Lukas): with ``Y = L^-1 P dA U^-1``, ``dL = L tril(Y, -1)`` and
    ``dU = triu(Y) U``, and ``d(lu) = dL + dU``. Transposed:
    ``ct_Y = tril(L^T Ḡ, -1) + triu(Ḡ U^T)``, ``ct_A = P^T L^-T ct_Y U^-T``. Undefined where
    ``A`` is singular (``U`` has a zero pivot); like JAX the result is then inf/NaN.
    """
    ct = cts[0]
    if ct is None:
        return [None]
    lu, _, permutation = out
    l, u = _lu_factors(lu)
    ct_y = jnp.tril(_mm(_T(l), ct), -1) + jnp.triu(_mm(ct, _T(u)))
    ct_y = _solve_tri(u, ct_y, left_side=False, lower=False, transpose_a=True)
    ct_pa = _solve_tri(l, ct_y, left_side=True, lower=True, transpose_a=True, unit_diagonal=True)
    return [_unpermute(ct_pa, permutation, axis=-2)]


# LAPACK's row swaps -> a permutation: integer in, integer out.
register_nondiff(lax.linalg.lu_pivots_to_permutation_p)


# --- qr -----------------------------------------------------------------------------------------
def _thin_qr_transpose(q, r, ct_q, ct_r):
    """Cotangent of ``X [..., m, n]`` (``m >= n``) for ``X = Q R``, ``Q [..., m, n]``.

    Forward (Towns): ``D = dX R^-1``, ``M = Q^H D``, ``Ω = tril(M, -1) - tril(M, -1)^H + i Im
    diag(M)``, ``dQ = Q (Ω - M) + D``, ``dR = (M - Ω) R``. Transposed with ``C = Q^T Ḡq - Ḡr R^T``
    (the cotangent of ``Ω``): ``ct_M = -C + Ω^T(C)``, ``ct_D = Ḡq + conj(Q) ct_M``,
    ``ct_X = ct_D R^-T``.
    """
    c = _mm(_T(q), ct_q) - _mm(ct_r, _T(r))
    omega_t = (jnp.tril(c, -1) - jnp.tril(_H(c), -1)
               + _eye(c.shape[-1], c) * (c - jnp.conj(c)) / 2)
    ct_d = ct_q + _mm(jnp.conj(q), omega_t - c)
    return _solve_tri(r, ct_d, left_side=False, lower=False, transpose_a=True)


def _qr_full_matrices_transpose(q, ct_q, n):
    """For ``m > n`` with ``full_matrices``, JAX extends the thin ``dQ_mn`` to the last ``p = m - n``
    columns (arXiv:2409.13374, eqs. 32-33): ``dQ_mp = dQ_mn Z^H - W (dQ_pn - Z dQ_nn)^H`` with
    ``Z = Q_pn (Q_nn - I)^-1`` and ``W = Q_mn + Q_mp Z``. Returns the cotangent of ``dQ_mn``."""
    q_mn, q_mp = q[..., :, :n], q[..., :, n:]
    q_nn, q_pn = q_mn[..., :n, :], q_mn[..., n:, :]
    g_mn, g_mp = ct_q[..., :, :n], ct_q[..., :, n:]
    z = _H(jnp.linalg.solve(_H(q_nn - _eye(n, q_nn)), _H(q_pn)))
    w = q_mn + _mm(q_mp, z)
    ct_e = -_H(_mm(_T(w), g_mp))  # cotangent of E = dQ_pn - Z dQ_nn
    return g_mn + _mm(g_mp, jnp.conj(z)) + jnp.concatenate([-_mm(_T(z), ct_e), ct_e], axis=-2)


@register_vjp(prims.qr_p)
def _qr_vjp(cts, x, *, out, pivoting, full_matrices, **params):
    """``X P = Q R`` (``P`` = identity unless ``pivoting``; its output ``p`` is integer).

    Tall/square (``m >= n``): the thin-QR transpose (``_thin_qr_transpose``); with
    ``full_matrices`` and ``m > n`` the extra columns of ``Q`` are carried back through JAX's
    extension (``_qr_full_matrices_transpose``; ``R``'s zero rows get no cotangent). Wide
    (``m < n``): ``X = [X1 X2]``, ``R = [R1 R2]``: ``X1 = Q R1`` is square, and
    ``dR2 = dQ^H X2 + Q^H dX2`` adds ``conj(X2) Ḡr2^H`` to ``Q``'s cotangent and gives
    ``ct_X2 = conj(Q) Ḡr2``. Undefined where ``X`` (``X1`` when wide) is rank deficient
    (``R^-1``). With ``pivoting`` the cotangent is un-permuted at the end.

    Differs from JAX in one case: for *pivoted wide* QR, JAX uses the unpivoted ``X2`` in
    ``dR2`` (its gradient disagrees with finite differences); bpkit uses the pivoted one.
    """
    q, r = out[0], out[1]
    ct_q, ct_r = instantiate_zeros(cts[0], q), instantiate_zeros(cts[1], r)
    m, n = x.shape[-2:]
    if pivoting:
        xp = jnp.take_along_axis(x, out[2][..., None, :], axis=-1)
    else:
        xp = x
    if m < n:
        x2, ct_r1, ct_r2 = xp[..., :, m:], ct_r[..., :, :m], ct_r[..., :, m:]
        ct_q = ct_q + _mm(jnp.conj(x2), _H(ct_r2))
        ct_x = jnp.concatenate([_thin_qr_transpose(q, r[..., :, :m], ct_q, ct_r1),
                                _mm(jnp.conj(q), ct_r2)], axis=-1)
    elif full_matrices and m > n:
        ct_q_mn = _qr_full_matrices_transpose(q, ct_q, n)
        ct_x = _thin_qr_transpose(q[..., :, :n], r[..., :n, :], ct_q_mn, ct_r[..., :n, :])
    else:
        ct_x = _thin_qr_transpose(q, r, ct_q, ct_r)
    if pivoting:
        ct_x = _unpermute(ct_x, out[2], axis=-1)
    return [ct_x]


# --- householder_product ------------------------------------------------------------------------
def _householder_product(a, taus):
    """``Q = H_1 ... H_k I[:, :n]`` with ``H_i = I - tau_i v_i v_i^H`` and ``v_i`` = column ``i``
    of ``a`` below the diagonal, ``1`` on it and ``0`` above (LAPACK's ``orgqr``), with
    ordinary operations."""
    m, n = a.shape[-2:]
    rows = np.arange(m)[:, None]
    q = jnp.broadcast_to(_eye(m, a, n), a.shape)
    for i in reversed(range(taus.shape[-1])):
        v = jnp.where(rows > i, a[..., :, i:i + 1], (rows == i).astype(a.dtype))
        q = q - taus[..., i, None, None] * _mm(v, _mm(_H(v), q))
    return q


@register_fwd_bwd(prims.householder_product_p)
def _householder_product_fwd_bwd(primals, active, **params):
    """The product of elementary reflectors (``_householder_product``), differentiated by running
    bpkit's engine on that explicit product. JAX has no derivative for this primitive (it
    raises); the result is checked against finite differences instead."""
    a, taus = primals
    outs = [prims.householder_product_p.bind(a, taus, **params)]

    def pullback(ct):
        jaxpr, consts, _ = compat.make_jaxpr(_householder_product, a, taus)
        _, backward, _ = vjp_jaxpr(jaxpr, consts, [a, taus], active)
        return backward([ct])

    return outs, pullback


# --- eigh ---------------------------------------------------------------------------------------
@register_vjp(prims.eigh_p)
def _eigh_vjp(cts, a, *, out, subset_by_index=None, **params):
    """``A = V diag(w) V^H`` (Hermitian ``A``; ``w`` real, ascending).

    Forward (Giles 2008; JAX): ``M = V^H dA V``, ``dw = Re diag(M)``, ``dV = V (F∘M)`` with
    ``F_ij = 1 / (w_j - w_i)`` off the diagonal and 0 on it. Transposed:
    ``ct_A = conj(V) (F∘(V^T Ḡv) + diag(Ḡw)) V^T`` (not symmetrized, as JAX; ``jnp.linalg.eigh``
    symmetrizes its input, which symmetrizes the gradient).

    Undefined for degenerate eigenvalues: ``F`` is then infinite and, exactly as JAX, the
    cotangent is inf/NaN whenever ``V`` has a cotangent (even a zero one); eigenvalue-only
    losses (``Ḡv`` a symbolic zero, e.g. ``eigvalsh``) stay finite. JAX derives ``V, w`` again
    from ``(A + A^H) / 2`` while bpkit reuses the forward's: identical for Hermitian ``A``.
    A partial decomposition (``subset_by_index``) is not differentiable (JAX raises too).
    """
    v, w = out
    n = a.shape[-1]
    if subset_by_index is not None and tuple(subset_by_index) != (0, n):
        raise NotImplementedError(
            "The derivative of a partial eigendecomposition (eigh with subset_by_index) is not "
            "defined (JAX does not define it either). Compute the full decomposition and slice "
            "its outputs instead.")
    ct_v, ct_w = cts
    inner = jnp.zeros(v.shape, v.dtype)
    if ct_w is not None:
        inner = inner + _diag_embed(ct_w.astype(v.dtype))
    if ct_v is not None:
        wc = w.astype(v.dtype)
        eye = _eye(n, v)
        f = 1 / (wc[..., None, :] - wc[..., :, None] + eye) - eye
        inner = inner + f * _mm(_T(v), ct_v)
    return [_mm(_mm(jnp.conj(v), inner), _T(v))]


# --- svd ----------------------------------------------------------------------------------------
def _svd_transpose(a, s, u, vt, ct_s, ct_u, ct_vt):
    """Cotangent of ``A [..., m, n]`` for the thin ``A = U diag(s) V^H`` (``V = vt^H``).

    Forward (JAX, after Townsend): ``dS = U^H dA V``, ``ds = Re diag(dS)``,
    ``F_ij = 1 / (s_j^2 - s_i^2)`` (0 on the diagonal),
    ``dU = U (F∘(dS S + S dS^H) + ½ (dS - dS^H)∘diag(1/s))`` (+ ``(I - U U^H) dA V S^-1`` if
    ``m > n``), ``dV = V (F∘(S dS + dS^H S))`` (+ ``(I - V V^H) dA^H U S^-1`` if ``n > m``).
    Each term is transposed in turn into the cotangent ``C`` of ``dS``; then
    ``ct_A = conj(U) C V^T`` plus the two projection terms.
    """
    m, n = a.shape[-2:]
    k = s.shape[-1]
    dtype = a.dtype
    s_row = s[..., None, :]
    sc = s_row.astype(dtype)
    c = jnp.zeros(s.shape + (k,), dtype)
    ct_a = jnp.zeros(a.shape, dtype)
    if ct_s is not None:
        c = c + _diag_embed(ct_s.astype(dtype))
    if ct_u is not None or ct_vt is not None:
        eye = _eye(k, s_row)
        f = (1 / ((s_row + _T(s_row)) * (s_row - _T(s_row)) + eye) - eye).astype(dtype)
    if ct_u is not None:
        ct_x = _mm(_T(u), ct_u)
        ct_y = f * ct_x
        c = c + (ct_y + _H(ct_y)) * sc
        zero = (s == 0).astype(s.dtype)
        s_inv = _diag_embed(1 / (s + zero) - zero).astype(dtype)
        ct_w = ct_x * s_inv
        c = c + (ct_w - _H(ct_w)) / 2
        if m > n:
            g = ct_u / sc
            ct_a = ct_a + _mm(g - _mm(jnp.conj(u), _mm(_T(u), g)), jnp.conj(vt))
    if ct_vt is not None:
        ct_v = _H(ct_vt)
        ct_y = f * _mm(jnp.conj(vt), ct_v)
        c = c + _T(sc) * (ct_y + _H(ct_y))
        if n > m:
            g = ct_v / sc
            ct_n = g - _mm(_T(vt), _mm(jnp.conj(vt), g))
            ct_a = ct_a + _H(_mm(ct_n, _T(u)))
    return ct_a + _mm(_mm(jnp.conj(u), c), jnp.conj(vt))


@register_fwd_bwd(prims.svd_p)
def _svd_fwd_bwd(primals, active, *, full_matrices, compute_uv, **params):
    """``A = U diag(s) V^H``; see ``_svd_transpose`` for the math.

    Like JAX, the derivative always needs ``U`` and ``V``: with ``compute_uv=False`` the forward
    pass computes the thin decomposition and returns ``s`` only. ``full_matrices=True`` is
    differentiable for square matrices only (JAX raises otherwise). Undefined for repeated
    singular values when ``U``/``V`` have cotangents (``F`` is infinite: inf/NaN, as JAX) and, for
    non-square ``A``, at zero singular values (``S^-1``).
    """
    (a,) = primals
    m, n = a.shape[-2:]
    if compute_uv and full_matrices and m != n:
        raise NotImplementedError(
            f"The derivative of svd with full_matrices=True is defined for square matrices only "
            f"(got {m}x{n}; JAX does not implement it either). Use full_matrices=False "
            "(jnp.linalg.svd(a, full_matrices=False)): the extra columns of U or V are not "
            "unique.")
    s, u, vt = prims.svd_p.bind(a, full_matrices=False, compute_uv=True, **params)
    outs = [s, u, vt] if compute_uv else [s]

    def pullback(cts):
        cts = list(cts) + [None] * (3 - len(cts))
        return [_svd_transpose(a, s, u, vt, *cts)]

    return outs, pullback


# --- custom_linear_solve ------------------------------------------------------------------------
@register_fwd_bwd(prims.linear_solve_p)
def _linear_solve_fwd_bwd(primals, active, *, const_lengths, jaxprs):
    """``x = A^-1 b`` for the user's ``matvec`` ``A`` (``lax.custom_linear_solve``), with the
    user's ``solve`` (and ``transpose_solve``) as the way to apply ``A^-1`` (``A^-T``).

    Implicit differentiation of ``A x = b``: ``dx = A^-1 (db - dA x)``. So ``ct_b = A^-T Ḡx``
    (a ``custom_linear_solve`` with the roles of the four functions transposed, as JAX's
    transpose rule binds it), and the constants of ``matvec`` get ``-(∂_p matvec(p, x))^T ct_b``,
    computed by running bpkit's engine on the ``matvec`` jaxpr. The constants of ``solve``,
    ``transpose_solve`` and ``vecmat`` get no cotangent (the solution does not depend on how it
    is computed), nor do auxiliary outputs. Needs ``transpose_solve`` (JAX too).
    """
    outs = prims.linear_solve_p.bind(*primals, const_lengths=const_lengths, jaxprs=jaxprs)
    n_consts = sum(const_lengths)
    b = primals[n_consts:]
    x = outs[:len(b)]
    matvec_consts = primals[:const_lengths.matvec]
    matvec_active = active[:const_lengths.matvec]
    transposed_lengths, transposed_jaxprs = const_lengths.transpose(), jaxprs.transpose()
    groups, start = [], 0
    for length in const_lengths:
        groups.append(primals[start:start + length])
        start += length
    transposed_consts = [c for g in type(const_lengths)(*groups).transpose() for c in g]

    def pullback(cts):
        if jaxprs.transpose_solve is None:
            raise TypeError(
                "custom_linear_solve needs transpose_solve to be reverse-differentiated (JAX "
                "needs it too). Pass transpose_solve= to lax.custom_linear_solve, or "
                "symmetric=True if the operator is symmetric.")
        ct_x = [instantiate_zeros(ct, xi) for ct, xi in zip(cts[:len(b)], x)]
        ct_b = prims.linear_solve_p.bind(*transposed_consts, *ct_x,
                                         const_lengths=transposed_lengths,
                                         jaxprs=transposed_jaxprs)[:len(b)]
        ct_consts = [None] * n_consts
        if any(matvec_active):
            matvec, consts = compat.open_jaxpr(jaxprs.matvec)
            _, backward, _ = vjp_jaxpr(matvec, consts, list(matvec_consts) + list(x),
                                       list(matvec_active) + [False] * len(x))
            pulled = backward(list(ct_b))[:const_lengths.matvec]
            ct_consts[:const_lengths.matvec] = [None if p is None else -p for p in pulled]
        return ct_consts + [ct if a else None for ct, a in zip(ct_b, active[n_consts:])]

    return outs, pullback

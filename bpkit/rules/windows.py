"""VJP rules of windowed reductions (pooling): ``reduce_window_sum``, ``reduce_window_max``,
``reduce_window_min``, and of ``select_and_scatter_add``/``select_and_gather_add`` (the
primitives of JAX's own max-pool gradient, met when bpkit differentiates a ``jax.grad``).

Geometry, per axis (all axes behave alike and independently): input size ``N``, window ``W``
with dilation ``wd`` (dilated window ``We = (W - 1) * wd + 1``), stride ``s``, padding
``(lo, hi)``, base dilation ``bd``. The input is dilated (``bd - 1`` holes between elements) and
padded, so that ``x[i]`` sits at padded position ``lo + i * bd``; output ``o`` reduces the
padded positions ``o * s + k * wd`` for ``k = 0 .. W-1``.

**Sum** (average pooling is a sum pool times a constant). ``ct_xp[p] = sum_{o, k : o*s + k*wd
= p} ct[o]``: dilate ``ct`` by ``s`` (interior padding ``s - 1``), shift it right by ``We - 1``
(the window, flipped, is the same window), and sum over windows with stride 1; only
``p = lo + i * bd`` is wanted, so the window stride is ``bd``. That is

    ct_x = reduce_window_sum(pad(ct, 0, (lo', hi', s - 1)), window W, window_dilation wd,
                             window_strides bd),
    lo' = We - 1 - lo,   hi' = (N - 1) * bd + We - lo' - ((O - 1) * s + 1),

with ``hi'`` sizing the result to ``N``; negative pads crop.

**Max / min.** The cotangent of each window goes, whole, to one element: the one JAX's
gradient picks. JAX transposes ``select_and_gather_add`` into ``select_and_scatter_add``
with ``select = ge`` (``le`` for min), which on CPU and GPU pads the operand explicitly with
the reduction's identity (``-inf`` for max; base-dilation holes hold it too) and runs XLA's
``SelectAndScatter``: it visits the window's positions in row-major order, starts from the
first, and moves to a candidate ``c`` whenever ``not select(current, c)``. So with ties the
*first* maximal element keeps the cotangent; a NaN takes over (and hands over to the next
element); and a padding position or hole wins only when it comes first and the window's real
elements are all ``-inf``, in which case the cotangent is dropped, all exactly as in JAX.
(TPU's ``SelectAndScatter`` handles padding natively and may differ in that last corner.)
The rule extracts the ``W`` strided windows' ``k``-th elements as ``W`` output-shaped slices,
replays that selection to find the chosen ``k`` of every window, and pads each
``select(chosen == k, ct, 0)`` back into place (interior padding ``s - 1``, offset
``k * wd - lo``). Every op used has a bpkit rule, so the rule can be differentiated again.
"""
from __future__ import annotations

import itertools

import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_vjp

P = lax


def _window_params(window_dimensions, window_strides, padding, base_dilation, window_dilation):
    return (tuple(window_dimensions), tuple(window_strides), tuple(tuple(p) for p in padding),
            tuple(base_dilation), tuple(window_dilation))


def _trivial_cotangent(ct, x):
    """``[None]`` for a non-float input, zeros for an empty output; ``None``: work to do."""
    if not compat.is_inexact(compat.typeof(x)):
        return [None]
    if np.size(ct) == 0:
        return [lax.full(np.shape(x), 0, x.dtype)]
    return None


@register_vjp(P.reduce_window_sum_p)
def _reduce_window_sum_vjp(ct, x, *, out, window_dimensions, window_strides, padding,
                           base_dilation, window_dilation, **params):
    """Dilate and shift ``ct``, then sum it over the same windows (module docstring)."""
    if (trivial := _trivial_cotangent(ct, x)) is not None:
        return trivial
    W, S, pads, BD, WD = _window_params(window_dimensions, window_strides, padding,
                                        base_dilation, window_dilation)
    config = []
    for n, o, w, s, (lo, _), bd, wd in zip(np.shape(x), np.shape(ct), W, S, pads, BD, WD):
        we = (w - 1) * wd + 1
        lo_ = we - 1 - lo
        hi_ = (n - 1) * bd + we - lo_ - ((o - 1) * s + 1)
        config.append((lo_, hi_, s - 1))
    spread = lax.pad(ct, lax.full((), 0, ct.dtype), config)
    res = P.reduce_window_sum_p.bind(
        spread, window_dimensions=W, window_strides=BD, padding=((0, 0),) * len(W),
        base_dilation=(1,) * len(W), window_dilation=WD)
    return [res]


def _chooser_vjp(select_prim, identity):
    def rule(ct, x, *, out, window_dimensions, window_strides, padding, base_dilation,
             window_dilation, **params):
        if (trivial := _trivial_cotangent(ct, x)) is not None:
            return trivial
        W, S, pads, BD, WD = _window_params(window_dimensions, window_strides, padding,
                                            base_dilation, window_dilation)
        x_shape, o_shape = np.shape(x), np.shape(ct)
        ident = lax.full((), identity, x.dtype)
        xp = lax.pad(x, ident, [(lo, hi, bd - 1) for (lo, hi), bd in zip(pads, BD)])
        dilated = [(n - 1) * bd + 1 for n, bd in zip(x_shape, BD)]  # unpadded, dilated input
        offsets = list(itertools.product(*[range(w) for w in W]))  # row-major window order

        # Replay SelectAndScatter: the chosen window element of every output.
        best = chosen = None
        for k, idx in enumerate(offsets):
            start = [i * wd for i, wd in zip(idx, WD)]
            limit = [st + (o - 1) * s + 1 for st, o, s in zip(start, o_shape, S)]
            cand = lax.slice(xp, start, limit, S)
            if best is None:
                best, chosen = cand, lax.full(o_shape, 0, np.int32)
                continue
            move = lax.bitwise_not(select_prim(best, cand))
            best = lax.select(move, cand, best)
            chosen = lax.select(move, lax.full(o_shape, k, np.int32), chosen)

        # Send each window's cotangent to its chosen element.
        zero = lax.full((), 0, ct.dtype)
        zeros = lax.full(o_shape, 0, ct.dtype)
        ct_dilated = None
        for k, idx in enumerate(offsets):
            part = lax.select(lax.eq(chosen, lax.full(o_shape, k, np.int32)), ct, zeros)
            config = []
            for n_d, o, i, s, (lo, _), wd in zip(dilated, o_shape, idx, S, pads, WD):
                start = i * wd - lo
                config.append((start, n_d - start - ((o - 1) * s + 1), s - 1))
            part = lax.pad(part, zero, config)
            ct_dilated = part if ct_dilated is None else ct_dilated + part
        if any(bd != 1 for bd in BD):  # keep the real elements, drop the holes
            ct_dilated = lax.slice(ct_dilated, (0,) * len(BD), dilated, BD)
        return [ct_dilated]
    return rule


register_vjp(P.reduce_window_max_p, _chooser_vjp(lax.ge, -np.inf))
register_vjp(P.reduce_window_min_p, _chooser_vjp(lax.le, np.inf))




# --- JAX's max-pool gradient primitives (second order through a jax.grad) -------------------
# select_and_gather_add(t, x) picks, per window, the element of t where x is selected (the max
# for ``ge``, the min for ``le``); select_and_scatter_add(s, x) sends each s[o] to the element
# its window selects. Both are linear in their first operand and each other's transposes; the
# operand x only decides positions, so its derivative is zero (as in JAX).
@register_vjp(P.select_and_gather_add_p)
def _select_and_gather_add_vjp(ct, t, x, *, out, select_prim, window_dimensions, window_strides,
                               padding, base_dilation, window_dilation):
    """Scatter ``ct`` back to the selected elements (JAX's transpose: base dilation is handled
    by padding ``x`` with the selection's identity and keeping the real positions)."""
    if any(d != 1 for d in window_dilation):
        raise NotImplementedError(
            "bpkit cannot differentiate select_and_gather_add with window dilation (JAX's "
            "gradient of it refuses this too).")
    dilated = any(d != 1 for d in base_dilation)
    if dilated:
        identity = -np.inf if select_prim is lax.ge_p else np.inf
        x = lax.pad(x, lax.full((), identity, x.dtype), [(0, 0, d - 1) for d in base_dilation])
    ct_t = P.select_and_scatter_add_p.bind(
        ct, x, select_prim=select_prim, window_dimensions=tuple(window_dimensions),
        window_strides=tuple(window_strides), padding=tuple(tuple(p) for p in padding))
    if dilated:
        ct_t = lax.slice(ct_t, (0,) * ct_t.ndim, ct_t.shape, base_dilation)
    return [ct_t, None]


@register_vjp(P.select_and_scatter_add_p)
def _select_and_scatter_add_vjp(ct, source, x, *, out, select_prim, window_dimensions,
                                window_strides, padding):
    """Each ``source[o]`` receives ``ct`` at the element its window selected."""
    ones = (1,) * len(window_dimensions)
    ct_source = P.select_and_gather_add_p.bind(
        ct, x, select_prim=select_prim, window_dimensions=tuple(window_dimensions),
        window_strides=tuple(window_strides), padding=tuple(tuple(p) for p in padding),
        base_dilation=ones, window_dilation=ones)
    return [ct_source, None]

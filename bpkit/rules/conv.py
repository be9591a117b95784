"""The VJP rule of ``conv_general_dilated``: N-d convolutions with any layout, strides, padding,
dilations and feature/batch groups.

Notation: one spatial axis (the others behave the same, independently), canonical layouts
``x[n, c, i]``, ``w[o, c, k]``, ``out[n, o, q]``. Let ``N`` be the input size, ``K`` the window
size, ``Q`` the output size, ``s`` the window stride, ``(lo, hi)`` the padding, ``ld`` the lhs
(input) dilation, ``rd`` the rhs (kernel) dilation and ``Ke = (K - 1) * rd + 1`` the dilated
window. The input is dilated (``ld - 1`` zeros between elements) and padded into ``xp``, of size
``L = (N - 1) * ld + 1 + lo + hi``, with ``x[i]`` at ``xp[lo + i * ld]``; then

    out[n, o, q] = sum_{c, k} xp[n, c, q * s + k * rd] * w[o, c, k],    Q = (L - Ke) // s + 1.

**lhs cotangent.** ``ct_xp[p] = sum_{q, k : q*s + k*rd = p} ct[q] w[k]``. Dilate ``ct`` by ``s``
(``ct~[j] = ct[j / s]``) and flip the kernel (``k -> K-1-k``): ``ct_xp[p] = sum_k
ct~[p - (Ke - 1) + k * rd] w[K-1-k]``, a correlation of ``ct~`` (shifted right by ``Ke - 1``)
with the flipped kernel. Only ``p = lo + i * ld`` is wanted, i.e. window stride ``ld``.
So ``ct_x`` is ``conv(ct, rev(w))`` with

    window_strides = ld,  lhs_dilation = s,  rhs_dilation = rd,
    padding lo' = Ke - 1 - lo,  hi' = (N - 1) * ld + Ke - lo' - ((Q - 1) * s + 1),

where ``hi'`` makes the padded ``ct~`` exactly ``(N - 1) * ld + Ke`` long, so the conv has ``N``
outputs. Either pad may be negative (a crop), which ``conv_general_dilated`` accepts. The
kernel's in/out feature axes swap roles (the new conv reads ``O`` channels and writes ``C``).

**rhs cotangent.** ``ct_w[o, c, k] = sum_{n, q} xp[n, c, k * rd + q * s] ct[n, o, q]``: a conv
whose *batch* is ``c`` and whose contracted *feature* is ``n``, with ``ct`` as the kernel:

    window_strides = rd,  rhs_dilation = s,  lhs_dilation = ld,
    padding lo' = lo,  hi' = hi - ((L - (Q - 1) * s - 1) - (K - 1) * rd),

``hi'`` dropping the input tail that no output window reached, so the conv has exactly ``K``
outputs. In dimension numbers: lhs spec ``(c, n, spatial)``, rhs spec ``(o, n, spatial)``,
out spec ``(c, o, spatial)`` — the primal specs with batch and feature entries swapped.

**Groups.** ``feature_group_count = G`` (``c`` in ``G`` major groups, each paired with a major
group of ``o``): for ``ct_x`` the new kernel has in-features ``O / G`` and out-features ``C``,
``w'[g * C/G + c, o] = w[g * O/G + o, c]``, and the conv keeps ``G`` feature groups; for
``ct_w`` the conv's batch axis is ``c``, so the groups become ``batch_group_count = G``.
``batch_group_count = B`` (the input batch in ``B`` major groups, each paired with a major group
of ``o``): for ``ct_x`` the same kernel reshuffle with ``G = B`` gives ``B * C`` output channels
ordered ``(b, c)``, whose ``b`` is moved back into the batch axis (major); for ``ct_w`` the
conv's contracted feature axis is ``n``, so the groups become ``feature_group_count = B``.
"""
from __future__ import annotations

import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_vjp


def _split_axis(x, axis, outer):
    """Reshape axis ``axis`` of size ``outer * inner`` into two axes ``(outer, inner)``."""
    shape = list(np.shape(x))
    shape[axis:axis + 1] = [outer, shape[axis] // outer]
    return lax.reshape(x, tuple(shape))


def _merge_axis(x, src, dst):
    """Move axis ``src`` next to axis ``dst`` (as its major part) and merge the two.

    ``dst`` indexes the axes after ``src`` is removed (so the result has ``dst`` at that place).
    """
    perm = [d for d in range(np.ndim(x)) if d != src]
    perm.insert(dst, src)
    x = lax.transpose(x, tuple(perm))
    shape = list(np.shape(x))
    shape[dst:dst + 2] = [shape[dst] * shape[dst + 1]]
    return lax.reshape(x, tuple(shape))


def _regroup_kernel(w, spec, groups):
    """``w'[g * I + c, o] = w[g * O/groups + o, c]`` with the out-feature axis ``spec[0]`` and the
    in-feature axis ``spec[1]`` (size ``I``) of a kernel in layout ``spec``; the result keeps
    the layout, with the two feature axes' roles swapped."""
    w = _split_axis(w, spec[0], groups)  # the out-feature axis becomes (G, O/G)
    return _merge_axis(w, spec[0], spec[1])  # G joins the in-feature axis: (G, I)


def _spatial_sizes(ct, x, w, dimension_numbers):
    """The spatial sizes ``(N, K, Q)`` of the input, the kernel and the output."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    return ([np.shape(x)[d] for d in lhs_spec[2:]], [np.shape(w)[d] for d in rhs_spec[2:]],
            [np.shape(ct)[d] for d in out_spec[2:]])


def lhs_cotangent(ct, x, w, *, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count, precision):
    """The input's cotangent: ``conv(ct, rev(w))`` ("lhs cotangent" in the module docstring)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    N, K, Q = _spatial_sizes(ct, x, w, dimension_numbers)
    pads = []
    for i in range(len(window_strides)):
        ke = (K[i] - 1) * rhs_dilation[i] + 1
        lo = ke - 1 - padding[i][0]
        hi = (N[i] - 1) * lhs_dilation[i] + ke - lo - ((Q[i] - 1) * window_strides[i] + 1)
        pads.append((lo, hi))
    groups = max(feature_group_count, batch_group_count)
    kernel = lax.rev(w, tuple(rhs_spec[2:]))
    if groups > 1:
        kernel = _regroup_kernel(kernel, rhs_spec, groups)
    # The new conv reads ct (layout out_spec) and writes the lhs layout; the kernel's in and out
    # feature axes trade places.
    t_rhs_spec = (rhs_spec[1], rhs_spec[0]) + tuple(rhs_spec[2:])
    dn = lax.ConvDimensionNumbers(tuple(out_spec), t_rhs_spec, tuple(lhs_spec))
    res = lax.conv_general_dilated(
        ct, kernel, window_strides=tuple(lhs_dilation), padding=pads,
        lhs_dilation=tuple(window_strides), rhs_dilation=tuple(rhs_dilation),
        dimension_numbers=dn, feature_group_count=groups, precision=precision)
    if batch_group_count > 1:
        # channels are (b, c): move b into the batch axis as its major part
        res = _split_axis(res, lhs_spec[1], batch_group_count)
        res = _merge_axis(res, lhs_spec[1], lhs_spec[0])
    return res


def rhs_cotangent(ct, x, w, *, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count, precision):
    """The kernel's cotangent: a conv of ``x`` with ``ct`` as the kernel ("rhs cotangent")."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    N, K, Q = _spatial_sizes(ct, x, w, dimension_numbers)
    pads = []
    for i in range(len(window_strides)):
        lo, hi = padding[i]
        L = (N[i] - 1) * lhs_dilation[i] + 1 + lo + hi
        unused = (L - (Q[i] - 1) * window_strides[i] - 1) - (K[i] - 1) * rhs_dilation[i]
        pads.append((lo, hi - unused))
    swap = lambda spec: (spec[1], spec[0]) + tuple(spec[2:])  # noqa: E731
    dn = lax.ConvDimensionNumbers(swap(lhs_spec), swap(out_spec), swap(rhs_spec))
    return lax.conv_general_dilated(
        x, ct, window_strides=tuple(rhs_dilation), padding=pads,
        lhs_dilation=tuple(lhs_dilation), rhs_dilation=tuple(window_strides),
        dimension_numbers=dn, feature_group_count=batch_group_count,
        batch_group_count=feature_group_count, precision=precision)


@register_vjp(lax.conv_general_dilated_p)
def _conv_general_dilated_vjp(ct, lhs, rhs, *, out, window_strides, padding, lhs_dilation,
                              rhs_dilation, dimension_numbers, feature_group_count,
                              batch_group_count, precision=None, preferred_element_type=None,
                              **params):
    """Each cotangent is one more ``conv_general_dilated`` (derivation in the module docstring),
    computed in the cotangent's dtype (that of ``preferred_element_type``, if given) and cast
    back to the operand's dtype."""
    conf = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                precision=precision)
    if np.size(ct) == 0 or np.size(lhs) == 0 or np.size(rhs) == 0:
        # Every output term multiplies an element of each operand (padding and dilation holes
        # are zeros), so with an empty operand or output both cotangents are zero.
        return [lax.full(np.shape(x), 0, x.dtype) if compat.is_inexact(compat.typeof(x)) else None
                for x in (lhs, rhs)]
    dt = ct.dtype
    cts = []
    for x, fn in ((lhs, lhs_cotangent), (rhs, rhs_cotangent)):
        if not compat.is_inexact(compat.typeof(x)):
            cts.append(None)
            continue
        c = fn(ct, lax.convert_element_type(lhs, dt), lax.convert_element_type(rhs, dt), **conf)
        cts.append(lax.convert_element_type(c, x.dtype))
    return cts

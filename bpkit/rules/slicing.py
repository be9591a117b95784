"""VJP rules of slicing, indexing, scatter and sort primitives.

Every one of them moves values between positions, so each rule sends the cotangent back to the
positions it came from:

* a **slice** (static or dynamic) pads its cotangent back with zeros (a dynamic one with
  ``dynamic_update_slice`` at the same, equally clamped, start indices);
* a **gather** and a **scatter-add** are each other's transposes: the gather's cotangent is a
  scatter-add of ``ct`` into zeros (repeated indices accumulate), the scatter-add's updates get
  the gather of ``ct``. ``_to_scatter_dnums``/``_to_gather_dnums`` translate the dimension
  numbers (offset dims <-> update window dims, collapsed slice dims <-> inserted window dims,
  start index map <-> scatter dims to operand dims, batching dims <-> batching dims);
* an overwriting **scatter** gives the operand ``ct`` where nothing was written, and each update
  the ``ct`` of the positions it won. With repeated indices the winner is whichever update the
  backend wrote last; exactly as JAX does, the rule finds it by scattering update ids and
  gathering them back (``_winning_updates``);
* a **sort**, **top_k** or **approx_top_k** applies the inverse of its permutation to ``ct``; the permutation comes
  from sorting an iota alongside the operands with the same parameters, so ties resolve exactly
  as in the forward pass.

Index operands are integers and never receive a cotangent (``None``). Out-of-bounds behaviour
follows the equation's ``mode``, which every backward gather/scatter reuses: ``clip`` clamps the
same way forwards and backwards, ``fill``/``drop`` drops the cotangent of out-of-bounds slices.
"""
from __future__ import annotations

import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_vjp
from bpkit.rules.helpers import zeros_like

P = lax


def _zeros(shape, dtype):
    return lax.full(tuple(shape), 0, dtype)


def _to_scatter_dnums(g: lax.GatherDimensionNumbers) -> lax.ScatterDimensionNumbers:
    """The scatter that puts back what the gather ``g`` took: its transpose's dimension numbers."""
    return lax.ScatterDimensionNumbers(
        update_window_dims=g.offset_dims,
        inserted_window_dims=g.collapsed_slice_dims,
        scatter_dims_to_operand_dims=g.start_index_map,
        operand_batching_dims=g.operand_batching_dims,
        scatter_indices_batching_dims=g.start_indices_batching_dims)


def _to_gather(s: lax.ScatterDimensionNumbers, operand_ndim: int, updates_shape):
    """The gather that reads back what the scatter ``s`` wrote: ``(dimension_numbers, slice_sizes)``.

    Inserted and batching operand dims have slice size 1; the others take, in order, the sizes
    of the updates' window dims.
    """
    dnums = lax.GatherDimensionNumbers(
        offset_dims=s.update_window_dims,
        collapsed_slice_dims=s.inserted_window_dims,
        start_index_map=s.scatter_dims_to_operand_dims,
        operand_batching_dims=s.operand_batching_dims,
        start_indices_batching_dims=s.scatter_indices_batching_dims)
    window = iter(s.update_window_dims)
    slice_sizes = tuple(1 if d in s.inserted_window_dims or d in s.operand_batching_dims
                        else updates_shape[next(window)] for d in range(operand_ndim))
    return dnums, slice_sizes


def _scatter_along(ct, idx, shape, axis):
    """Zeros of ``shape`` with ``ct[..., j, ...]`` added at ``[..., idx[..., j, ...], ...]`` along
    ``axis``: the transpose of ``take_along_axis``; applies the inverse permutation when ``idx``
    is one."""
    others = tuple(d for d in range(len(shape)) if d != axis)
    dnums = lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(axis,), scatter_dims_to_operand_dims=(axis,),
        operand_batching_dims=others, scatter_indices_batching_dims=others)
    return lax.scatter_add(_zeros(shape, ct.dtype), lax.expand_dims(idx, (idx.ndim,)), ct, dnums,
                           indices_are_sorted=False, unique_indices=True,
                           mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


# --- slices ---------------------------------------------------------------------------------
@register_vjp(P.slice_p)
def _slice_vjp(ct, x, *, out, start_indices, limit_indices, strides):
    """Pad ``ct`` back: ``start`` zeros before, ``stride - 1`` between, the rest after.

    With strides the last element taken is ``start + (n - 1) * stride``, not ``limit - 1``.
    """
    strides = strides or (1,) * len(start_indices)
    taken_to = [s + (n - 1) * st + 1 if n else s
                for s, n, st in zip(start_indices, ct.shape, strides)]
    config = [(s, size - end, st - 1)
              for s, end, size, st in zip(start_indices, taken_to, np.shape(x), strides)]
    return [lax.pad(ct, lax.full((), 0, ct.dtype), config)]


@register_vjp(P.dynamic_slice_p)
def _dynamic_slice_vjp(ct, x, *indices, out, slice_sizes, **params):
    """Write ``ct`` into zeros at the same start indices.

    Both primitives clamp each start into ``[0, n - size]``; a negative start that reaches the
    primitive clamps to 0 (``lax.dynamic_slice`` wraps negative indices *before* binding, so
    its wrapper must not be called again on the equation's indices: the primitive is bound).
    The zeros are built in the cotangent's dtype, and the result cast to the operand's.
    """
    starts = indices[:np.ndim(x)]
    ct_x = P.dynamic_update_slice_p.bind(_zeros(np.shape(x), ct.dtype), ct, *starts)
    return [lax.convert_element_type(ct_x, compat.typeof(x).dtype), *[None] * len(indices)]


@register_vjp(P.dynamic_update_slice_p)
def _dynamic_update_slice_vjp(ct, x, update, *starts, out, **params):
    """The operand keeps ``ct`` outside the written window; the update gets the window of ``ct``
    (the primitives are bound with the equation's start indices, clamped as in the forward)."""
    ct_x = P.dynamic_update_slice_p.bind(ct, _zeros(np.shape(update), ct.dtype), *starts)
    ct_update = P.dynamic_slice_p.bind(ct, *starts, slice_sizes=tuple(np.shape(update)))
    return [ct_x, lax.convert_element_type(ct_update, compat.typeof(update).dtype),
            *[None] * len(starts)]


# --- gather and scatters --------------------------------------------------------------------
@register_vjp(P.gather_p)
def _gather_vjp(ct, x, indices, *, out, dimension_numbers, slice_sizes, unique_indices,
                indices_are_sorted, mode, fill_value):
    """Scatter-add ``ct`` into zeros at the gathered positions: repeated indices accumulate,
    out-of-bounds slices (fill mode) are dropped, clipped ones land where they were read."""
    ct_x = lax.scatter_add(_zeros(np.shape(x), ct.dtype), indices, ct,
                           _to_scatter_dnums(dimension_numbers),
                           indices_are_sorted=indices_are_sorted, unique_indices=unique_indices,
                           mode=mode)
    return [ct_x, None]


def _gather_ct(ct, indices, updates, dimension_numbers, mode, **flags):
    """``ct`` read back at the positions each update was scattered to (0 where it was dropped)."""
    dnums, sizes = _to_gather(dimension_numbers, ct.ndim, np.shape(updates))
    return lax.gather(ct, indices, dnums, sizes, mode=mode, fill_value=0, **flags)


@register_vjp(P.scatter_add_p)
def _scatter_add_vjp(ct, x, indices, updates, *, out, dimension_numbers, indices_are_sorted,
                     unique_indices, mode, **params):
    """``out = x + scatter(updates)``: the operand gets ``ct``, the updates the gather of ``ct``."""
    ct_updates = _gather_ct(ct, indices, updates, dimension_numbers, mode,
                            indices_are_sorted=indices_are_sorted, unique_indices=unique_indices)
    return [ct, None, ct_updates]


@register_vjp(P.scatter_sub_p)
def _scatter_sub_vjp(ct, x, indices, updates, *, out, dimension_numbers, indices_are_sorted,
                     unique_indices, mode, **params):
    ct_updates = _gather_ct(ct, indices, updates, dimension_numbers, mode,
                            indices_are_sorted=indices_are_sorted, unique_indices=unique_indices)
    return [ct, None, -ct_updates]


def _winning_updates(x, indices, updates, dnums, mode, indices_are_sorted):
    """``(overwritten, won)``: which operand elements a scatter wrote to, and which update
    elements are the ones that remained there (with repeated indices, only one update wins).

    Each scatter index gets an id ``1, 2, ...`` (shared by its whole window); the ids are
    scattered with the same parameters as the forward pass, so the backend picks the same
    winners, and gathered back: an update element won where it reads back its own id. The read
    back clamps (as XLA's gather does), so a clipped update that won at its clamped position is
    found there, and a dropped one reads someone else's id.
    """
    ids_shape = [1 if d in dnums.update_window_dims else n for d, n in enumerate(np.shape(updates))]
    num_ids = int(np.prod(ids_shape))
    id_dtype = np.uint32 if num_ids < np.iinfo(np.uint32).max else np.uint64
    ids = lax.reshape(lax.iota(id_dtype, num_ids) + id_dtype(1), ids_shape)
    ids = lax.broadcast_in_dim(ids, np.shape(updates), tuple(range(len(ids_shape))))
    scattered = lax.scatter(_zeros(np.shape(x), id_dtype), indices, ids, dnums,
                            indices_are_sorted=indices_are_sorted, unique_indices=False, mode=mode)
    gdnums, sizes = _to_gather(dnums, np.ndim(x), np.shape(updates))
    read_back = lax.gather(scattered, indices, gdnums, sizes, mode=lax.GatherScatterMode.CLIP)
    return scattered != id_dtype(0), ids == read_back


@register_vjp(P.scatter_p)
def _scatter_vjp(ct, x, indices, updates, *, out, dimension_numbers, indices_are_sorted,
                 unique_indices, mode, update_jaxpr=None, **params):
    """Overwrite: the operand gets ``ct`` where it survived, each update the ``ct`` it won.

    With ``unique_indices`` every in-bounds update wins; otherwise ``_winning_updates`` tells
    the winners apart (JAX's own convention for repeated indices).
    """
    if update_jaxpr is not None:
        raise NotImplementedError(
            "bpkit cannot differentiate a scatter with a custom combiner (lax.scatter_apply); "
            "write the update with .at[].set/add/mul, or wrap it in jax.lax.stop_gradient.")
    flags = dict(indices_are_sorted=indices_are_sorted)
    ct_updates = _gather_ct(ct, indices, updates, dimension_numbers, mode, **flags,
                            unique_indices=unique_indices)
    if unique_indices:
        ct_x = lax.scatter(ct, indices, _zeros(np.shape(updates), ct.dtype), dimension_numbers,
                           unique_indices=True, mode=mode, **flags)
        return [ct_x, None, ct_updates]
    overwritten, won = _winning_updates(x, indices, updates, dimension_numbers, mode,
                                        indices_are_sorted)
    ct_x = lax.select(overwritten, zeros_like(ct), ct)
    return [ct_x, None, lax.select(won, ct_updates, zeros_like(ct_updates))]


@register_vjp(P.scatter_mul_p)
def _scatter_mul_vjp(ct, x, indices, updates, *, out, dimension_numbers, indices_are_sorted,
                     unique_indices, mode, **params):
    """``out[p] = x[p] * prod_{k -> p} updates[k]``.

    The operand gets ``ct`` times the product of its updates (``scatter_mul(ct, ...)``). Update
    ``k`` gets the gather of ``ct * x`` times the product of the *other* updates at its
    position: 1 with unique indices (JAX's rule, which it restricts to that case); with
    repeats, the product of the nonzero updates divided by ``updates[k]`` when no update there
    is zero, that product itself where ``updates[k]`` is the only zero, else 0.
    """
    flags = dict(indices_are_sorted=indices_are_sorted, unique_indices=unique_indices, mode=mode)
    ct_x = lax.scatter_mul(ct, indices, updates, dimension_numbers, **flags)
    ct_updates = _gather_ct(ct * x, indices, updates, dimension_numbers, mode,
                            indices_are_sorted=indices_are_sorted, unique_indices=unique_indices)
    if unique_indices:
        return [ct_x, None, ct_updates]
    one, zero = lax.full((), 1, updates.dtype), lax.full((), 0, updates.dtype)
    is_zero = updates == zero
    nonzero = lax.select(is_zero, lax.full_like(updates, 1), updates)
    shape = np.shape(x)
    nonzero_prod = lax.scatter_mul(lax.full(shape, 1, updates.dtype), indices, nonzero,
                                   dimension_numbers, **flags)
    num_zeros = lax.scatter_add(_zeros(shape, updates.dtype), indices,
                                lax.convert_element_type(is_zero, updates.dtype),
                                dimension_numbers, **flags)
    prod_at, zeros_at = (_gather_ct(v, indices, updates, dimension_numbers, mode,
                                    indices_are_sorted=indices_are_sorted)
                         for v in (nonzero_prod, num_zeros))
    others = lax.select(is_zero,
                        lax.select(zeros_at == one, prod_at, zeros_like(prod_at)),
                        lax.select(zeros_at == zero, prod_at / nonzero, zeros_like(prod_at)))
    return [ct_x, None, ct_updates * others]


def _scatter_extremal_vjp(ct, x, indices, updates, *, out, dimension_numbers,
                          indices_are_sorted, unique_indices, mode, **params):
    """``out[p] = max(x[p], max_{k -> p} updates[k])`` (or min).

    JAX's convention, as for ``max``: the cotangent at ``p`` is shared evenly among everything
    that attains ``out[p]``: the updates equal to it and the operand when it is equal too.
    Contended positions hold ``n`` successful updates (plus the operand, if it was retained):
    each gets ``1/n`` (or ``1/(n+1)``) of ``ct[p]``, and the operand keeps that share of it. The
    operand's part is written as ``ct + scatter_add(G * operand_coef)``, which subtracts
    ``(1 - share) / num_refs`` of ``ct[p]`` once per reference to ``p``.
    """
    flags = dict(indices_are_sorted=indices_are_sorted, unique_indices=unique_indices, mode=mode)
    dnums, sizes = _to_gather(dimension_numbers, np.ndim(x), np.shape(updates))

    def gather(v, **fill):
        return lax.gather(v, indices, dnums, sizes, **flags, **fill)

    def scatter_add(v):
        return lax.scatter_add(zeros_like(x), indices, v, dimension_numbers, **flags)

    target = gather(out)
    successful = updates == target  # this update attains out[p]
    retained = gather(x) == target  # the operand attains out[p] too
    ones, zeros = lax.full_like(updates, 1), zeros_like(updates)
    num_updates = gather(scatter_add(lax.select(successful, ones, zeros)))
    num_refs = gather(scatter_add(ones))
    share = lax.select(retained, ones / (num_updates + ones), ones / num_updates)
    updates_coef = lax.select(successful, share, zeros)
    operand_coef = (lax.select(retained, share, zeros) - ones) / num_refs

    ct_at = gather(ct, fill_value=0)
    return [ct + scatter_add(ct_at * operand_coef), None, ct_at * updates_coef]


register_vjp(P.scatter_max_p, _scatter_extremal_vjp)
register_vjp(P.scatter_min_p, _scatter_extremal_vjp)


# --- sorting --------------------------------------------------------------------------------
@register_vjp(P.sort_p)
def _sort_vjp(cts, *operands, out, dimension, is_stable, num_keys):
    """Each operand's cotangent is its ``ct`` put back in unsorted order.

    The permutation is recovered by sorting an iota along with all the operands, with the same
    ``dimension``/``is_stable``/``num_keys`` as the forward pass, so ties land where they did.
    """
    shape = np.shape(operands[0])
    iota = lax.broadcasted_iota(np.int32, shape, dimension)
    perm = lax.sort((*operands, iota), dimension=dimension, is_stable=is_stable,
                    num_keys=num_keys)[-1]
    return [_scatter_along(ct, perm, shape, dimension)
            if ct is not None and compat.is_inexact(compat.typeof(x)) else None
            for ct, x in zip(cts, operands)]


@register_vjp(P.top_k_p)
def _top_k_vjp(cts, x, *, out, k, axis=-1, **params):
    """The values' cotangent goes back to the positions named by the returned indices."""
    ct_values = cts[0]
    if ct_values is None:
        return [None]
    axis = axis % np.ndim(x)
    return [_scatter_along(ct_values, out[1], np.shape(x), axis)]


_approx_top_k_p = compat.internal_primitive("approx_top_k_p")  # lax.approx_max_k/approx_min_k


@register_vjp(_approx_top_k_p)
def _approx_top_k_vjp(cts, x, *, out, reduction_dimension, **params):
    """As ``top_k``: the values' cotangent goes back to the positions of the returned indices."""
    if cts[0] is None:
        return [None]
    axis = reduction_dimension % np.ndim(x)
    return [_scatter_along(cts[0], out[1], np.shape(x), axis)]

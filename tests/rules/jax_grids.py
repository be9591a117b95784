"""The parameter grids of JAX's own ``tests/lax_autodiff_test.py``, rewritten as bpkit cases.

JAX checks each of its primitives' derivatives over grids of shapes and parameters (to second
order, forward and reverse). ``GRIDS`` rebuilds those grids for the primitive families bpkit
rules here (elementwise, structural, slicing/gather/scatter, reductions, cumulative, windows,
conv, dot_general): ``tests/rules/test_jax_grids.py`` runs every case through ``bpkit.vjp`` and
``jax.vjp`` (first order in float32 and float64, second order in float64).

Where JAX samples a few cases out of a large product (its convolution grids have thousands of
combinations), the product is thinned deterministically (``_every``). Complex dtypes and the
special functions (bessel) belong to the complex-number branch and are not ported here.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclass(frozen=True)
class GridCase:
    family: str
    name: str
    fun: Callable
    make_args: Callable  # (rng, dtype) -> tuple of arguments
    argnums: tuple = (0,)
    order: int = 2
    rtol: float | None = None

    def __str__(self):
        return f"{self.family}:{self.name}"


# --- argument makers ----------------------------------------------------------------------------
def default(*shape, scale=2.0):
    return lambda rng, dt: jnp.asarray(rng.uniform(-scale, scale, shape), dt)


def positive(*shape, lo=0.5, hi=2.0):
    return lambda rng, dt: jnp.asarray(rng.uniform(lo, hi, shape), dt)


def not_small(*shape):
    """Magnitudes in [0.5, 2] with random signs (away from the poles of div, rem, cbrt)."""
    return lambda rng, dt: jnp.asarray(rng.uniform(0.5, 2.0, shape) * rng.choice([-1, 1], shape), dt)


def unique(*shape):
    """Distinct values (no ties for max/min/sort: their derivatives are then smooth)."""
    def make(rng, dt):
        n = int(np.prod(shape))
        return jnp.asarray(rng.permutation(n).reshape(shape) / max(n, 1) * 4 - 2, dt)
    return make


def fixed(value):
    return lambda rng, dt: value


def arguments(*pieces):
    return lambda rng, dt: tuple(p(rng, dt) for p in pieces)


def _every(items, n, offset=0):
    """Every ``n``-th item: a deterministic thinning of a large product (as JAX samples one)."""
    return items[offset::n]


def _shape_str(*shapes):
    return "_".join("x".join(map(str, s)) or "scalar" for s in shapes)


# --- elementwise (LAX_GRAD_OPS, special values, convert_element_type, clamp, rem, pow) -------
COMPATIBLE_SHAPES = [[(3,)], [(), (3, 4), (3, 1), (1, 4)], [(2, 3, 4), (2, 1, 4)]]

UNARY = [  # (name, op, argument maker)
    ("neg", lax.neg, default), ("floor", lax.floor, lambda *s: positive(*s, lo=0.1, hi=0.4)),
    ("ceil", lax.ceil, lambda *s: positive(*s, lo=0.1, hi=0.4)),
    ("round", lax.round, lambda *s: positive(*s, lo=0.1, hi=0.4)),
    ("exp", lax.exp, lambda *s: default(*s, scale=0.5)),
    ("exp2", lax.exp2, lambda *s: default(*s, scale=0.5)), ("expm1", lax.expm1, default),
    ("log", lax.log, positive), ("log1p", lax.log1p, positive), ("sinh", lax.sinh, default),
    ("cosh", lax.cosh, default), ("tanh", lax.tanh, default), ("sin", lax.sin, default),
    ("cos", lax.cos, default), ("tan", lax.tan, lambda *s: default(*s, scale=1.3)),
    ("asin", lax.asin, lambda *s: default(*s, scale=0.9)),
    ("acos", lax.acos, lambda *s: default(*s, scale=0.9)),
    ("atan", lax.atan, default), ("erf", lax.erf, lambda *s: default(*s, scale=0.5)),
    ("erfc", lax.erfc, lambda *s: default(*s, scale=0.5)),
    ("erf_inv", lax.erf_inv, lambda *s: default(*s, scale=0.5)), ("abs", lax.abs, positive),
    ("sqrt", lax.sqrt, positive), ("rsqrt", lax.rsqrt, positive), ("cbrt", lax.cbrt, not_small),
    ("logistic", lax.logistic, default), ("square", lax.square, default),
    ("lgamma", lax.lgamma, positive),
]
BINARY = [
    ("add", lax.add, default, default), ("sub", lax.sub, default, default),
    ("mul", lax.mul, default, default), ("div", lax.div, not_small, not_small),
    ("max", lax.max, default, default), ("min", lax.min, default, default),
    ("atan2", lax.atan2, default, default), ("pow", lax.pow, positive, positive),
    ("rem", lax.rem, default, not_small), ("nextafter_x", None, None, None),
]


def _elementwise():
    cases = []
    for name, op, make in UNARY:
        for group in COMPATIBLE_SHAPES:
            for shape in group:
                cases.append(GridCase("elementwise", f"{name}_{_shape_str(shape)}", op,
                                      arguments(make(*shape))))
    for shape in [(3,), (3, 4)]:  # second order needs polygamma (the complex branch's)
        cases.append(GridCase("elementwise", f"digamma_{_shape_str(shape)}", lax.digamma,
                              arguments(positive(*shape)), order=1))
    for name, op, make_x, make_y in BINARY:
        if op is None:
            continue
        for group in COMPATIBLE_SHAPES:
            for sx, sy in itertools.combinations_with_replacement(group, 2):
                cases.append(GridCase("elementwise", f"{name}_{_shape_str(sx, sy)}", op,
                                      arguments(make_x(*sx), make_y(*sy)), argnums=(0, 1)))
    special = [(lax.sinh, [0.0]), (lax.cosh, [0.0]), (lax.tanh, [0.0, 1000.0]),
               (lax.sin, [0.0, np.pi, np.pi / 2, np.pi / 4]),
               (lax.cos, [0.0, np.pi, np.pi / 2, np.pi / 4]), (lax.tan, [0.0]),
               (lax.asin, [0.0]), (lax.acos, [0.0]), (lax.atan, [0.0, 1000.0]),
               (lax.erf, [0.0, 10.0]), (lax.erfc, [0.0, 10.0])]
    for op, values in special:
        for v in values:
            cases.append(GridCase("elementwise", f"{op.__name__}_at_{v:g}", op,
                                  lambda rng, dt, v=v: (jnp.asarray(v, dt),)))
    for to in ("float32", "float64"):
        cases.append(GridCase("elementwise", f"convert_element_type_to_{to}",
                              lambda x, to=to: lax.convert_element_type(x, to), arguments(default(2, 3))))
    for shape in [(), (2, 3)]:
        def clamp_args(rng, dt, shape=shape):
            x = jnp.asarray(rng.uniform(-2, 2, shape), dt)
            return x - 10, x, x + 10
        for which in range(3):  # the operand, the lower and the upper bound in turn
            cases.append(GridCase("elementwise", f"clamp_arg{which}_{_shape_str(shape)}",
                                  lambda lo, x, hi: lax.clamp(lo, x, hi), clamp_args,
                                  argnums=(which,)))
    for sx, sy in [((5, 8), (1, 8)), ((1, 8), (5, 8))]:  # testRemainder
        cases.append(GridCase("elementwise", f"rem_{_shape_str(sx, sy)}", lax.rem,
                              arguments(default(*sx, scale=9.0), not_small(*sy)), argnums=(0, 1)))
    cases.append(GridCase("elementwise", "pow_second_derivative_at_zero_exponent", lax.pow,
                          lambda rng, dt: (jnp.asarray(4.0, dt), jnp.asarray(0.0, dt)),
                          argnums=(0, 1)))
    return cases


# --- structural -----------------------------------------------------------------------------
def _structural():
    cases = []
    for base in [(4,), (3, 4), (2, 3, 4)]:
        for dim in range(len(base)):
            shapes = [base[:dim] + (n,) + base[dim + 1:] for n in (3, 1, 4)]
            cases.append(GridCase("structural", f"concatenate_{_shape_str(base)}_dim{dim}",
                                  lambda *xs, dim=dim: lax.concatenate(xs, dim),
                                  arguments(*[default(*s) for s in shapes]), argnums=(0, 1, 2)))
            for pieces in range(3):
                sizes = [(2 * k + dim + 1) % 5 for k in range(pieces + 1)]
                shape = base[:dim] + (sum(sizes),) + base[dim + 1:]
                cases.append(GridCase("structural", f"split_{_shape_str(base)}_dim{dim}_{pieces}",
                                      lambda x, sizes=sizes, dim=dim: lax.split(x, sizes, dim),
                                      arguments(default(*shape))))
    for shape in [(), (2, 3)]:
        for sizes in [(), (2,), (1, 2)]:
            cases.append(GridCase("structural", f"broadcast_{_shape_str(shape)}_by_{_shape_str(sizes)}",
                                  lambda x, sizes=sizes: lax.broadcast(x, sizes),
                                  arguments(default(*shape))))
    for ins, outs, dims in [((2,), (2, 2), (0,)), ((2,), (2, 2), (1,)), ((2,), (2, 3), (0,)),
                            ((), (2, 3), ())]:
        cases.append(GridCase("structural", f"broadcast_in_dim_{_shape_str(ins, outs)}_{dims}",
                              lambda x, outs=outs, dims=dims: lax.broadcast_in_dim(x, outs, dims),
                              arguments(default(*ins))))
    for ins, outs, perm in [((3, 4), (12,), None), ((2, 1, 4), (8,), None),
                            ((2, 2, 4), (2, 8), None), ((3, 4), (12,), (0, 1)),
                            ((3, 4), (12,), (1, 0)), ((2, 1, 4), (8,), (0, 2, 1)),
                            ((2, 1, 4), (8,), (2, 0, 1)), ((2, 2, 4), (2, 8), (0, 2, 1)),
                            ((2, 2, 4), (2, 8), (2, 0, 1))]:
        cases.append(GridCase("structural", f"reshape_{_shape_str(ins, outs)}_{perm}",
                              lambda x, outs=outs, perm=perm: lax.reshape(x, outs, perm),
                              arguments(default(*ins))))
    for shape, pads in [((), ()), ((2, 3), ((1, 2, 1), (0, 1, 0))),
                        ((2, 3), ((-1, 0, 0), (-1, 0, 2)))]:
        cases.append(GridCase("structural", f"pad_{_shape_str(shape)}_{pads}",
                              lambda x, v, pads=pads: lax.pad(x, v, pads),
                              arguments(default(*shape), default()), argnums=(0, 1)))
    for shape, dims in [((3,), (0,)), ((2, 3), (0, 1))]:
        cases.append(GridCase("structural", f"rev_{_shape_str(shape)}",
                              lambda x, dims=dims: lax.rev(x, dims), arguments(default(*shape))))
    for shape, perm in [((3, 4), (1, 0)), ((3, 4), (0, 1)), ((3, 4, 5), (2, 1, 0)),
                        ((3, 4, 5), (1, 0, 2))]:
        cases.append(GridCase("structural", f"transpose_{_shape_str(shape)}_{perm}",
                              lambda x, perm=perm: lax.transpose(x, perm), arguments(default(*shape))))
    for arg_shape in [(), (3,), (2, 3)]:
        for pred_shape in ([(), arg_shape] if arg_shape else [()]):
            pred = fixed(jnp.asarray(np.arange(int(np.prod(pred_shape))).reshape(pred_shape) % 2 == 0))
            cases.append(GridCase("structural", f"select_{_shape_str(arg_shape)}_pred_{_shape_str(pred_shape)}",
                                  lambda p, a, b: lax.select(p, a, b),
                                  arguments(pred, default(*arg_shape), default(*arg_shape)),
                                  argnums=(1, 2)))
    from jax._src.lax import lax as lax_internal  # lax.tile is not exported on every release
    for shape, reps in [((3,), (2,)), ((2, 3), (1, 2)), ((1, 1, 4), (1, 3, 1))]:
        cases.append(GridCase("structural", f"tile_{_shape_str(shape)}_{reps}",
                              lambda x, reps=reps: lax_internal.tile(x, reps),
                              arguments(default(*shape)), order=3))
    return cases


# --- slicing, gather, scatter, sort ------------------------------------------------------------
def _slicing():
    cases = []
    for shape, starts, limits, strides in [
            ((3,), (1,), (2,), None), ((7,), (4,), (7,), None), ((5,), (1,), (5,), (2,)),
            ((8,), (1,), (6,), (2,)), ((5, 3), (1, 1), (3, 2), None),
            ((5, 3), (1, 1), (3, 1), None), ((7, 5, 3), (4, 0, 1), (7, 1, 3), None),
            ((5, 3), (1, 1), (2, 1), (1, 1)), ((5, 3), (1, 1), (5, 3), (2, 1)),
            ((3, 3, 5), (0, 2, 0), (3, 2, 5), (1, 2, 1))]:
        cases.append(GridCase("slicing", f"slice_{_shape_str(shape)}_{starts}_{limits}_{strides}",
                              lambda x, s=starts, l=limits, st=strides: lax.slice(x, s, l, st),
                              arguments(default(*shape))))
    for shape, starts, sizes in [((3,), (1,), (1,)), ((5, 3), (1, 1), (3, 1)),
                                 ((7, 5, 3), (4, 1, 0), (2, 0, 1))]:
        cases.append(GridCase("slicing", f"dynamic_slice_{_shape_str(shape)}_{starts}",
                              lambda x, s=starts, z=sizes: lax.dynamic_slice(x, s, z),
                              arguments(default(*shape))))
        for argnums in [(0, 1), (0,), (1,)]:
            cases.append(GridCase("slicing", f"dynamic_update_slice_{_shape_str(shape)}_{argnums}",
                                  lambda x, u, s=starts: lax.dynamic_update_slice(x, u, np.array(s)),
                                  arguments(default(*shape), default(*sizes)), argnums=argnums))
    for shape, index in [((5, 5), -8)]:  # out-of-range negative index (JAX issue 10984)
        cases.append(GridCase("slicing", "dynamic_index_far_negative",
                              lambda x, i=index: lax.dynamic_index_in_dim(x, i, 0),
                              arguments(default(*shape))))
        cases.append(GridCase("slicing", "dynamic_update_index_far_negative",
                              lambda x, y, i=index: lax.dynamic_update_index_in_dim(x, y, i, 0),
                              arguments(default(*shape), default(1, 5)), argnums=(0, 1)))
    for idxs, axes in [((np.array([0, 2, 1]),), (0,)), ((np.array([-1, -2]),), (0,)),
                       ((np.array([0, 2]), np.array([1, 3])), (0, 1)),
                       ((np.array([0, 2]), np.array([1, 3])), (0, 2))]:
        cases.append(GridCase("slicing", f"index_take_{axes}_{idxs[0].tolist()}",
                              lambda x, idxs=idxs, axes=axes: _index_take(x, idxs, axes),
                              arguments(default(3, 4, 5))))
    gathers = [((5,), (2, 1), lax.GatherDimensionNumbers((), (0,), (0,)), (1,), 5),
               ((10,), (3, 1), lax.GatherDimensionNumbers((1,), (), (0,)), (2,), 9),
               ((10, 5), (3, 1), lax.GatherDimensionNumbers((1,), (0,), (0,)), (1, 3), 3)]
    for k, (shape, idx_shape, dnums, sizes, max_idx) in enumerate(gathers):
        for mode in ("clip", "fill", "promise_in_bounds"):
            for it in range(5):
                idx = _indices(k, mode, it, idx_shape, max_idx)
                cases.append(GridCase(
                    "slicing", f"gather{k}_{mode}_{it}",
                    lambda x, idx=idx, dnums=dnums, sizes=sizes, mode=mode: lax.gather(
                        x, idx, dnums, sizes, mode=mode, fill_value=-1),
                    arguments(default(*shape))))
    scatters = [((5,), (2, 1), (2,), lax.ScatterDimensionNumbers((), (0,), (0,)), 4, 1),
                ((10,), (3, 1), (3, 2), lax.ScatterDimensionNumbers((1,), (), (0,)), 9, 2),
                ((10, 5), (3, 1), (3, 3), lax.ScatterDimensionNumbers((1,), (0,), (0,)), 3, 1)]
    for k, (shape, idx_shape, upd_shape, dnums, max_idx, multiplier) in enumerate(scatters):
        for mode in ("clip", "fill", "promise_in_bounds"):
            for it in range(5):
                idx = _indices(k, mode, it, idx_shape, max_idx)
                cases.append(GridCase(
                    "slicing", f"scatter_add{k}_{mode}_{it}",
                    lambda x, y, idx=idx, dnums=dnums, mode=mode: lax.scatter_add(
                        x, idx, y, dnums, mode=mode),
                    arguments(default(*shape), default(*upd_shape)), argnums=(0, 1)))
        rng = np.random.default_rng(100 + k)
        unique_idx = (rng.permutation(min(max_idx, 4) + 1)[:idx_shape[0]] * multiplier
                      ).reshape(idx_shape).astype(np.int32)
        cases.append(GridCase("slicing", f"scatter{k}",
                              lambda x, y, idx=unique_idx, dnums=dnums: lax.scatter(x, idx, y, dnums),
                              arguments(default(*shape), default(*upd_shape)), argnums=(0, 1)))
        repeated = np.random.default_rng(200 + k).integers(0, max(shape), idx_shape).astype(np.int32)
        for op in (lax.scatter_max, lax.scatter_min):
            cases.append(GridCase("slicing", f"{op.__name__}{k}",
                                  lambda x, y, idx=repeated, dnums=dnums, op=op: op(x, idx, y, dnums),
                                  arguments(unique(*shape), unique(*upd_shape)), argnums=(0, 1)))
    cases.append(GridCase("slicing", "scatter_symbolic_zero_update",
                          lambda x: x.at[np.diag_indices(5)].set(jnp.arange(5, dtype=x.dtype)),
                          arguments(default(5, 5))))
    for shape in [(0,), (5,), (5, 7), (4, 9, 3)]:
        for stable in (False, True):
            cases.append(GridCase("slicing", f"sort_{_shape_str(shape)}_stable{stable}",
                                  lambda x, s=stable: lax.sort(x, dimension=x.ndim - 1, is_stable=s),
                                  arguments(unique(*shape))))
    for shape in [(3,), (5, 3), (4, 9, 3)]:
        for stable in (False, True):
            cases.append(GridCase("slicing", f"sort_key_val_{_shape_str(shape)}_stable{stable}",
                                  lambda k, v, s=stable: lax.sort_key_val(k, v, k.ndim - 1, s),
                                  arguments(unique(*shape), default(*shape)), argnums=(0, 1)))
    for shape in [(4,), (5, 5), (3, 1, 4)]:
        for k in (1, 3):
            for axis in (0, -1):
                if k > shape[axis]:
                    continue
                cases.append(GridCase("slicing", f"top_k_{_shape_str(shape)}_k{k}_axis{axis}",
                                      lambda x, k=k, axis=axis: _top_k(x, k, axis),
                                      arguments(unique(*shape))))
    return cases


def _indices(k, mode, it, shape, max_idx):
    """Gather/scatter indices: in bounds for promise_in_bounds, else from [-max, 2 max)."""
    rng = np.random.default_rng(zlib.crc32(f"{k}{mode}{it}".encode()))
    lo = 0 if mode == "promise_in_bounds" else -max_idx
    hi = max_idx if mode == "promise_in_bounds" else 2 * max_idx
    return rng.integers(lo, hi, shape).astype(np.int32)


def _index_take(x, idxs, axes):
    """lax.index_take (removed from newer JAX): ``x[idxs...]`` along ``axes``, as a gather."""
    idxs = jnp.stack(jnp.broadcast_arrays(*[jnp.asarray(i) for i in idxs]), axis=-1)
    offset = tuple(range(1, x.ndim - len(axes) + 1))
    dnums = lax.GatherDimensionNumbers(offset_dims=offset, collapsed_slice_dims=axes,
                                       start_index_map=axes)
    sizes = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
    return lax.gather(x, idxs, dnums, sizes, mode="clip")


def _top_k(x, k, axis):
    """top_k along ``axis`` (older JAX releases only take the last axis)."""
    moved = jnp.moveaxis(x, axis, -1)
    return jnp.moveaxis(lax.top_k(moved, k)[0], -1, axis)


# --- reductions and cumulative reductions ------------------------------------------------------
REDUCE_SHAPES = [((), ()), ((3, 4, 5), ()), ((3, 4, 5), (0,)), ((3, 4, 5), (1, 2)),
                 ((3, 4, 5), (0, 2)), ((3, 4, 5), (0, 1, 2)), ((3, 1), (1,)), ((3, 0, 5), (1,))]


def _reductions():
    cases = []
    for name, op, init, make in [("add", lax.add, 0.0, default), ("max", lax.max, -np.inf, unique),
                                 ("min", lax.min, np.inf, unique),
                                 ("mul", lax.mul, 1.0, lambda *s: default(*s, scale=1.0))]:
        for shape, dims in REDUCE_SHAPES:
            if op in (lax.max, lax.min) and 0 in shape:
                continue  # JAX skips these too (no element to choose)
            cases.append(GridCase("reductions", f"reduce_{name}_{_shape_str(shape)}_{dims}",
                                  lambda x, op=op, init=init, dims=dims: lax.reduce(
                                      x, np.asarray(init, x.dtype), op, dims),
                                  arguments(make(*shape))))
    for shape, dims in REDUCE_SHAPES[1:]:
        cases.append(GridCase("reductions", f"reduce_pair_{_shape_str(shape)}_{dims}",
                              lambda x, y, dims=dims: lax.reduce(
                                  (x, y), (jnp.zeros((), x.dtype), jnp.ones((), y.dtype)),
                                  lambda a, b: (a[0] + b[0], a[1] * b[1]), dims),
                              arguments(default(*shape, scale=1.0), default(*shape, scale=1.0)),
                              argnums=(0, 1)))
    for op in (lax.cumsum, lax.cumprod, lax.cummax, lax.cummin, lax.cumlogsumexp):
        for shape in [(10,), (3, 4, 5)]:
            for axis in range(len(shape)):
                for reverse in (False, True):
                    make = unique if op in (lax.cummax, lax.cummin) else (
                        lambda *s: default(*s, scale=1.0))
                    cases.append(GridCase("cumulative", f"{op.__name__}_{_shape_str(shape)}_"
                                          f"axis{axis}_rev{reverse}",
                                          lambda x, op=op, a=axis, r=reverse: op(x, axis=a, reverse=r),
                                          arguments(make(*shape))))
    return cases


# --- windowed reductions -------------------------------------------------------------------------
def _windows():
    cases = []
    for name, op, init, make in [("add", lax.add, 0.0, lambda *s: default(*s, scale=1.0)),
                                 ("max", lax.max, -np.inf, unique), ("min", lax.min, np.inf, unique)]:
        grid = list(itertools.product(
            [(4, 6)], [(2, 1), (1, 2)], [(1, 1), (2, 1), (1, 2)],
            ["VALID", "SAME", ((0, 3), (1, 2))], [(1, 1), (2, 3)],
            [(1, 1)] + ([(1, 2)] if op is lax.add else [])))
        grid += list(itertools.product(
            [(3, 2, 4, 6)], [(1, 1, 2, 1), (2, 1, 2, 1)], [(1, 2, 2, 1), (1, 1, 1, 1)],
            ["VALID", "SAME", ((0, 1), (1, 0), (2, 3), (0, 2))],
            [(1, 1, 1, 1), (2, 1, 3, 2)], [(1, 1, 1, 1)] + ([(1, 2, 2, 1)] if op is lax.add else [])))
        for k, (shape, dims, strides, padding, base, wdil) in enumerate(grid):
            cases.append(GridCase(
                "windows", f"reduce_window_{name}_{k}_{_shape_str(shape)}",
                lambda x, op=op, init=init, d=dims, s=strides, p=padding, b=base, w=wdil:
                    lax.reduce_window(x, np.asarray(init, x.dtype), op, d, s, p, b, w),
                arguments(make(*shape)), order=3 if op is lax.add else 2))
    return cases


# --- convolutions ---------------------------------------------------------------------------------
def _conv():
    cases = []
    conv_grid = [((b, i, 3, 4), (j, i, 1, 2), s) for b, i, j in itertools.product([2, 3], repeat=3)
                 for s in [(1, 1), (1, 2), (2, 1)]] + [((4, 2, 1), (3, 2, 1), (1,))]
    for k, (ls, rs, strides) in enumerate(conv_grid):
        for padding in ("VALID", "SAME"):
            cases.append(GridCase("conv", f"conv_{k}_{_shape_str(ls, rs)}_{padding}",
                                  lambda x, w, s=strides, p=padding: lax.conv(
                                      x, w, s, p, precision=lax.Precision.HIGHEST),
                                  arguments(default(*ls, scale=1.0), default(*rs, scale=1.0)),
                                  argnums=(0, 1)))
    general = []
    for b, i, j in itertools.product([2, 3], repeat=3):
        for strides, pads, ldil in itertools.product(
                [(1, 1), (1, 2), (2, 1)], [((0, 0), (0, 0)), ((-1, 0), (0, -1)), ((1, 0), (0, 1))],
                [(1, 1), (2, 1)]):
            general.append(((b, i, 3, 4), (j, i, 1, 2), strides, pads, ldil, (1, 1)))
    for strides, pads, ldil, rdil in itertools.product([(1,)], [((1, 1),), ((0, 0),)],
                                                       [(1,), (2,)], [(1,), (2,)]):
        general.append(((4, 2, 1), (3, 2, 1), strides, pads, ldil, rdil))
    for k, (ls, rs, strides, pads, ldil, rdil) in enumerate(_every(general, 3)):
        cases.append(GridCase("conv", f"conv_with_general_padding_{k}",
                              lambda x, w, s=strides, p=pads, l=ldil, r=rdil:
                                  lax.conv_with_general_padding(
                                      x, w, s, p, l, r, precision=lax.Precision.HIGHEST),
                              arguments(default(*ls, scale=1.0), default(*rs, scale=1.0)),
                              argnums=(0, 1)))
    dilated = []
    for bgc, fgc in [(1, 1), (2, 1), (1, 2)]:
        for b, i, j in itertools.product([1, 2], repeat=3):
            for lhs in [(b * bgc, i * fgc, 6, 7), (b * bgc, i * fgc, 0, 4)]:
                rhs = (j * bgc * fgc, i, 1, 2)
                pads_list = [((0, 0), (0, 0)), ((1, 0), (0, 1))] + (
                    [((0, -1), (0, 0))] if lhs[2] != 0 else [])
                for strides, rdil, ldil, pads in itertools.product(
                        [(1, 1), (1, 2), (2, 1)], [(1, 1), (2, 2)], [(1, 1), (2, 1)], pads_list):
                    for dn, perms in [(("NCHW", "OIHW", "NCHW"), ((0, 1, 2, 3), (0, 1, 2, 3))),
                                      (("NHWC", "HWIO", "NHWC"), ((0, 2, 3, 1), (2, 3, 1, 0))),
                                      (("NHWC", "OIHW", "NCHW"), ((0, 2, 3, 1), (0, 1, 2, 3)))]:
                        dilated.append((tuple(np.take(lhs, perms[0])), tuple(np.take(rhs, perms[1])),
                                        strides, pads, ldil, rdil, dn, fgc, bgc))
    for k, (ls, rs, strides, pads, ldil, rdil, dn, fgc, bgc) in enumerate(_every(dilated, 40, 7)):
        cases.append(GridCase("conv", f"conv_general_dilated_{k}_{_shape_str(ls, rs)}",
                              lambda x, w, s=strides, p=pads, l=ldil, r=rdil, dn=dn, f=fgc, g=bgc:
                                  lax.conv_general_dilated(
                                      x, w, s, p, l, r, dn, feature_group_count=f,
                                      batch_group_count=g, precision=lax.Precision.HIGHEST),
                              arguments(default(*ls, scale=1.0), default(*rs, scale=1.0)),
                              argnums=(0, 1)))
    return cases


# --- dot ------------------------------------------------------------------------------------------
def _dot():
    cases = []
    for ls, rs in itertools.product([(2,), (3, 2)], [(2,), (2, 4)]):
        cases.append(GridCase("dot", f"dot_{_shape_str(ls, rs)}",
                              lambda x, y: lax.dot(x, y, precision=lax.Precision.HIGHEST),
                              arguments(default(*ls), default(*rs)), argnums=(0, 1)))
    for ls, rs, dims in [((3, 2), (2, 4), (([1], [0]), ([], []))),
                         ((3, 5), (2, 5), (([1], [1]), ([], []))),
                         ((5, 3), (5, 2), (([0], [0]), ([], []))),
                         ((3, 3, 2), (3, 2, 4), (([2], [1]), ([0], [0]))),
                         ((3, 5, 2), (2, 4, 5), (([2], [0]), ([1], [2]))),
                         ((7, 3, 5, 2), (2, 2, 4, 5), (([3], [0]), ([2], [3])))]:
        cases.append(GridCase("dot", f"dot_general_{_shape_str(ls, rs)}",
                              lambda x, y, d=dims: lax.dot_general(
                                  x, y, d, precision=lax.Precision.HIGHEST),
                              arguments(default(*ls), default(*rs)), argnums=(0, 1)))
    return cases


GRIDS: list[GridCase] = (_elementwise() + _structural() + _slicing() + _reductions() +
                         _windows() + _conv() + _dot())

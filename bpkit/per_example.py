"""Per-example gradient norms without per-example gradients, and DP-SGD clipping.

``per_example_grad_norms(loss)(params, batch)`` gives ``||grad_params loss(params, example_b)||``
for every example ``b`` of a batch (globally and per parameter leaf), equal to the norms of
``jax.vmap(jax.grad(loss))`` over one-example batches, for a loss that sums or averages
independent per-example terms.

How: one ordinary forward and backward pass of the batch loss, watched by an equation
observer (``bpkit.engine.core.observing``). Where a parameter meets the batch, the equation's
input activation and output cotangent determine the per-example gradient's norm:

* **dense** (``dot_general`` with the examples on the activation side): the example's gradient
  is ``G_b = X_b^T Δ_b`` (``X_b``: ``T x C`` activations over the ``T`` positions of a sequence,
  ``Δ_b``: ``T x G`` output cotangents), so ``||G_b||² = Σ_{t,s} (x_t·x_s)(δ_t·δ_s)`` ("ghost"
  norm, ``O(T²(C+G))``) or ``||X_b^T Δ_b||²`` formed directly (``O(T·C·G)``), whichever is
  cheaper; for ``T = 1`` it is ``||x||² ||δ||²``;
* **convolutions**: the same with ``X_b`` the unfolded patches (``T`` output positions);
* **embeddings** (``gather`` of table rows): ``||G_b||² = Σ_{t,s} [i_t = i_s] (δ_t·δ_s)``;
* **biases, norm scales, positional tables** (a parameter broadcast over the examples and
  combined elementwise): the equation's cotangent for the broadcast parameter, summed over the
  broadcast axes per example: ``O(size of the activation)``;
* ``custom_vjp``/``custom_jvp`` functions that take parameters (bpkit's fused layer norm) are
  seen through: their primal function is re-run in the backward pass under the observer.

Every other parameter (used twice, inside a scan, combined with another parameter, ...) falls
back to exact per-example gradients for that leaf only (``jax.vmap`` of bpkit's ``grad``
over one-example batches, differentiating only those leaves).

DP-SGD (``clipped_value_and_grad``): the per-example norms give clip factors
``c_b = min(1, C / ||g_b||)``; a second backward pass from the same forward pass, seeded at the
per-example losses (the inputs of the equations that sum over the examples) with ``c_b`` times
their cotangent, gives ``Σ_b c_b g_b`` exactly (Opacus' "ghost clipping"). Noise is added by
the caller (``bpkit.train.dp``).

Assumptions, checked where possible: the loss is ``mean`` (``loss_reduction="mean"``, the
default) or ``sum`` over the examples of a per-example loss; examples do not interact (a
batch statistic such as BatchNorm's is refused with an error naming its line).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpkit.engine import api, compat, core, registry


class ExampleGradNorms(NamedTuple):
    """``norms``: ``(B,)`` global per-example gradient norms; ``leaf_norms``: the
    differentiated argument's structure (a tuple of them for several ``argnums``) with a
    ``(B,)`` array of per-example norms at every leaf (zeros for integer leaves)."""

    norms: Any
    leaf_norms: Any


class PerExampleError(ValueError):
    """The loss is not a sum or mean of independent per-example terms."""


# ------------------------------------------------------------------ classes of variables
@dataclasses.dataclass(frozen=True)
class _Cls:
    """What a variable holds with respect to the examples and the parameters.

    kind: ``const`` (neither), ``param`` (computed from one parameter leaf only), ``mixed``
    (from several leaves, no example), ``batched`` (one example per slice along ``axis``;
    that axis has ``B * inner`` entries, example-major), ``reduced`` (summed over the
    examples), ``unknown`` (depends on the examples in a way not tracked).
    For ``param``: ``iso`` (the map from its cotangent to the leaf's keeps norms: reshapes,
    transposes, slices, casts) and ``bcast`` (axes an explicit broadcast added on top of an
    ``iso`` chain: summed per example)."""

    kind: str
    leaves: tuple = ()
    iso: bool = True
    bcast: tuple = ()
    axis: int = -1
    inner: int = 1


CONST = _Cls("const")
UNKNOWN = _Cls("unknown")
REDUCED = _Cls("reduced")


def _param(leaf: int) -> _Cls:
    return _Cls("param", (leaf,))


def _batched(axis: int, inner: int = 1) -> _Cls:
    return _Cls("batched", axis=axis, inner=inner)


def _prims(*names):
    out = set()
    for n in names:
        p = getattr(prims, n + "_p", None) or compat.internal_primitive(n + "_p")
        if p is not None:
            out.add(p)
    return out


ELEMENTWISE = _prims(
    "abs", "acos", "acosh", "add", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt",
    "ceil", "clamp", "conj", "convert_element_type", "copy", "cos", "cosh", "digamma", "div",
    "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "lgamma", "log", "log1p", "logistic", "lt", "max", "min",
    "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision", "rem",
    "round", "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh",
    "xor", "complex", "polygamma", "igamma", "igammac", "zeta", "bessel_i0e", "bessel_i1e",
    "stop_gradient")
# Unary maps whose cotangent map keeps norms (a cotangent is cast or negated elementwise).
ISO_ELEMENTWISE = _prims("convert_element_type", "copy", "neg", "reduce_precision")
REDUCTIONS = _prims("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or", "reduce_xor", "argmax", "argmin")
CUMULATIVE = _prims("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
CALLS = _prims("jit", "pjit", "closed_call", "remat")
CUSTOM = _prims("custom_jvp_call", "custom_vjp_call")
SPLIT = _prims("split")
PASS_THROUGH = _prims("optimization_barrier")


def _shape(v) -> tuple:
    return tuple(getattr(v, "aval", v).shape) if not isinstance(v, tuple) else v


# ------------------------------------------------------------------------------- analysis
@dataclasses.dataclass
class _Use:
    leaf: int
    plan: Any | None        # a plan for a ghost norm, or None (this leaf falls back)
    why: str


class _Analysis:
    """Walks a jaxpr, classifying every variable (``_Cls``); records per-parameter uses and,
    for ghost-able ones, a plan keyed by the path of equation ids the engine's observer will
    see (``plans``); collects the equations that sum over the examples (``reducers``)."""

    def __init__(self, batch_size: int):
        self.B = batch_size
        self.uses: list[_Use] = []
        # (top-level eqn, batched operand index, its class): the equations that sum over the
        # examples, whose batched inputs are the per-example losses.
        self.reducers: list[tuple[Any, int, _Cls]] = []
        self.loss_path: set | None = None

    # -- entry ----------------------------------------------------------------------------
    def run(self, jaxpr, in_cls: Sequence[_Cls], prefix: tuple, plans: dict | None,
            top: bool = False) -> list[_Cls]:
        env: dict = {}
        for v, c in zip(jaxpr.invars, in_cls):
            env[v] = c
        for v in jaxpr.constvars:
            env[v] = CONST
        path = _loss_path(jaxpr) if top else None

        def read(v):
            return CONST if isinstance(v, compat.Literal) else env.get(v, CONST)

        for eqn in jaxpr.eqns:
            cls_in = [read(v) for v in eqn.invars]
            on_path = path is None or id(eqn) in path
            cls_out = self.equation(eqn, cls_in, prefix, plans, top and on_path, on_path)
            for v, c in zip(eqn.outvars, cls_out):
                if not isinstance(v, compat.DropVar):
                    env[v] = c
        outs = [read(v) for v in jaxpr.outvars]
        for c in outs[:1] if top else ():
            for leaf in (c.leaves if c.kind in ("param", "mixed") else ()):
                self.uses.append(_Use(leaf, None, "it reaches the loss without meeting the "
                                                  "examples (a regularizer)"))
        return outs

    # -- one equation ---------------------------------------------------------------------
    def equation(self, eqn, cls_in, prefix, plans, top: bool, on_path: bool) -> list[_Cls]:
        prim = eqn.primitive
        kinds = {c.kind for c in cls_in}
        n_out = len(eqn.outvars)
        params_in = [i for i, c in enumerate(cls_in) if c.kind in ("param", "mixed")]
        example_in = [i for i, c in enumerate(cls_in) if c.kind in ("batched", "unknown")]

        if prim in CALLS:  # the engine inlines these: follow into the body
            inner, _ = _open(compat.jit_jaxpr(eqn.params))
            return self.run(inner, cls_in, prefix + (id(eqn),), plans)
        if prim in CUSTOM:
            inner, consts = _open(compat.custom_vjp_call_jaxpr(eqn.params))
            if params_in and example_in and plans is not None:
                child: dict = {}
                out = self.run(inner, cls_in, (), child)
                plans.setdefault(prefix + (id(eqn),), []).append(
                    _CallPlan(inner, consts, child, list(cls_in)))
                return out
            if params_in and example_in:
                for i in params_in:
                    self._opaque(cls_in[i], f"it enters {prim.name} inside a loop or branch")
            return self.run(inner, cls_in, (), None)

        if "reduced" in kinds and ("batched" in kinds or "unknown" in kinds) and on_path:
            raise PerExampleError(
                f"The examples interact at '{prim.name}' ({compat.user_frame(eqn)}): it "
                "combines a value summed over the batch with per-example values (batch "
                "statistics, as BatchNorm computes). Per-example gradients are defined for a "
                "loss that sums or averages independent per-example terms.")
        if params_in and "reduced" in kinds:
            for i in params_in:
                self._opaque(cls_in[i], "it is combined with the batch-summed loss")
            return [REDUCED] * n_out
        if not example_in:
            return self._param_side(eqn, cls_in, params_in)
        if params_in:
            return self._frontier(eqn, cls_in, params_in, prefix, plans)
        out = self._batched_rule(eqn, cls_in)
        if top and any(c.kind == "reduced" for c in out):
            for i in example_in:
                self.reducers.append((eqn, i, cls_in[i]))
        return out

    def _opaque(self, c: _Cls, why: str) -> None:
        for leaf in c.leaves:
            self.uses.append(_Use(leaf, None, why))

    # -- parameter-side equations (no examples involved) ----------------------------------
    def _param_side(self, eqn, cls_in, params_in) -> list[_Cls]:
        n_out = len(eqn.outvars)
        if not params_in:
            if any(c.kind == "reduced" for c in cls_in):
                return [REDUCED] * n_out
            return [CONST] * n_out
        leaves = tuple(sorted({l for i in params_in for l in cls_in[i].leaves}))
        if len(leaves) > 1 or len(params_in) > 1 or cls_in[params_in[0]].kind == "mixed":
            return [_Cls("mixed", leaves)] * n_out
        c = cls_in[params_in[0]]
        prim, x, out = eqn.primitive, eqn.invars[params_in[0]], eqn.outvars[0]
        if n_out == 1 and prim in ISO_ELEMENTWISE:
            return [c]                                       # casts keep iso and bcast
        if c.bcast:
            return [_Cls("param", c.leaves, iso=False)] * n_out
        size_kept = int(np.prod(_shape(x))) == int(np.prod(_shape(out))) if n_out == 1 else False
        iso_shape = {prims.reshape_p, prims.transpose_p, prims.squeeze_p, prims.rev_p,
                     prims.broadcast_in_dim_p}
        if n_out == 1 and prim in iso_shape and size_kept:
            return [c]
        if n_out == 1 and prim in (prims.slice_p, prims.dynamic_slice_p) and params_in == [0]:
            return [c]                                       # zero-padding cotangent map
        if n_out == 1 and prim is prims.broadcast_in_dim_p and c.iso:
            dims = eqn.params["broadcast_dimensions"]
            shape_in, shape_out = _shape(x), _shape(out)
            added = tuple(d for d in range(len(shape_out))
                          if d not in dims or shape_in[dims.index(d)] != shape_out[d])
            return [_Cls("param", c.leaves, iso=True, bcast=added)]
        return [_Cls("param", c.leaves, iso=False)] * n_out

    # -- where a parameter meets the examples ---------------------------------------------
    def _frontier(self, eqn, cls_in, params_in, prefix, plans) -> list[_Cls]:
        out = self._batched_rule(eqn, [c if c.kind not in ("param", "mixed") else CONST
                                       for c in cls_in])
        prim = eqn.primitive
        key = prefix + (id(eqn),)
        plan, why = None, f"it meets the examples in '{prim.name}' at {compat.user_frame(eqn)}"
        if len(params_in) == 1 and plans is not None:
            i = params_in[0]
            u = cls_in[i]
            if u.kind == "param":
                plan, reason = _make_plan(self, eqn, cls_in, i, out)
                why = reason or why
        if plans is None:
            why += " (inside a loop or branch)"
        if plan is not None:
            plans.setdefault(key, []).append(plan)
            for leaf in cls_in[params_in[0]].leaves:
                self.uses.append(_Use(leaf, plan, ""))
        else:
            for i in params_in:
                self._opaque(cls_in[i], why)
        return out

    # -- the example axis through an equation ---------------------------------------------
    def _batched_rule(self, eqn, cls_in) -> list[_Cls]:
        prim, p = eqn.primitive, eqn.params
        n_out = len(eqn.outvars)
        shapes_in = [_shape(v) if not isinstance(v, compat.Literal) else np.shape(v.val)
                     for v in eqn.invars]
        shapes_out = [_shape(v) for v in eqn.outvars]
        batched = [(i, c) for i, c in enumerate(cls_in) if c.kind == "batched"]
        if prim in PASS_THROUGH:  # one output per operand, unchanged
            return list(cls_in)
        if any(c.kind == "unknown" for c in cls_in) or not batched:
            if any(c.kind == "reduced" for c in cls_in):
                return [REDUCED] * n_out
            return [UNKNOWN] * n_out
        axes = {(c.axis, c.inner) for _, c in batched}
        i0, c0 = batched[0]
        k, inner = c0.axis, c0.inner
        out0 = shapes_out[0] if shapes_out else ()

        if prim in ELEMENTWISE:
            if len(axes) == 1 and len(out0) == len(shapes_in[i0]) and out0[k] == shapes_in[i0][k]:
                return [c0] * n_out
            return [UNKNOWN] * n_out
        if len(batched) > 1 and len(axes) > 1:
            return [UNKNOWN] * n_out
        if prim is prims.broadcast_in_dim_p:
            dims = p["broadcast_dimensions"]
            return [_batched(dims[k], inner) if out0[dims[k]] == shapes_in[i0][k] else UNKNOWN]
        if prim is prims.reshape_p:
            return [_reshape_axis(shapes_in[i0], out0, k, inner, self.B)]
        if prim is prims.transpose_p:
            return [_batched(list(p["permutation"]).index(k), inner)]
        if prim is prims.squeeze_p:
            dims = [d % len(shapes_in[i0]) for d in p["dimensions"]]
            return [_batched(k - sum(d < k for d in dims), inner) if k not in dims else UNKNOWN]
        if prim in REDUCTIONS:
            axes_r = tuple(p["axes"])
            if k in axes_r:
                return [REDUCED] * n_out
            return [_batched(k - sum(a < k for a in axes_r), inner)] * n_out
        if prim in CUMULATIVE or prim is prims.sort_p or prim is prims.rev_p:
            along = p.get("axis", p.get("dimension", p.get("dimensions")))
            along = tuple(along) if isinstance(along, (tuple, list)) else (along,)
            return [c0] * n_out if k not in along else [UNKNOWN] * n_out
        if prim is prims.dot_general_p:
            return [_dot_axis(eqn, i0, k, inner)]
        if prim is prims.conv_general_dilated_p:
            dn = p["dimension_numbers"]
            if i0 == 0 and len(batched) == 1 and k == dn.lhs_spec[0] and inner == 1 and \
                    p.get("batch_group_count", 1) == 1:
                return [_batched(dn.out_spec[0])]
            return [UNKNOWN]
        if prim in (prims.slice_p, prims.dynamic_slice_p, prims.pad_p,
                    prims.dynamic_update_slice_p, prims.concatenate_p, prims.reduce_precision_p,
                    prims.copy_p) or prim in SPLIT:
            if all(s[k] == shapes_in[i0][k] for s in shapes_out) and (
                    prim is not prims.concatenate_p or p["dimension"] != k):
                return [c0] * n_out
            return [UNKNOWN] * n_out
        if prim is prims.gather_p:
            return [_gather_axis(eqn, cls_in, shapes_in, out0)]
        if prim is prims.top_k_p:
            return [c0] * n_out if k != len(shapes_in[i0]) - 1 else [UNKNOWN] * n_out
        if prim in CUSTOM or prim in CALLS:
            return [UNKNOWN] * n_out
        if prim is prims.scan_p:
            return self._scan_axes(eqn, cls_in)
        return [UNKNOWN] * n_out

    def _scan_axes(self, eqn, cls_in) -> list[_Cls]:
        """Out classes of a scan: the body's, with the carries iterated to a fixpoint and the
        stacked axis accounted for (parameters inside a scan fall back)."""
        n_consts, n_carry = compat.scan_counts(eqn.params)
        body, _ = compat.open_jaxpr(eqn.params["jaxpr"])
        consts, carry, xs = (cls_in[:n_consts], cls_in[n_consts:n_consts + n_carry],
                             cls_in[n_consts + n_carry:])
        xs_in = [_batched(c.axis - 1, c.inner) if c.kind == "batched" and c.axis > 0
                 else (UNKNOWN if c.kind == "batched" else c) for c in xs]
        for _ in range(3):
            out = self.run(body, list(consts) + list(carry) + xs_in, (), None)
            new_carry = [a if a == b else (UNKNOWN if "const" not in (a.kind, b.kind) else
                                           (a if b.kind == "const" else b))
                         for a, b in zip(carry, out[:n_carry])]
            if new_carry == list(carry):
                break
            carry = new_carry
        ys = [_batched(c.axis + 1, c.inner) if c.kind == "batched" else c
              for c in out[n_carry:]]
        return list(carry) + ys


def _open(jaxpr):
    """``(open jaxpr, consts)`` of a closed or open jaxpr (as rules/control.py reads them)."""
    return compat.open_jaxpr(jaxpr) if hasattr(jaxpr, "consts") else (jaxpr, [])


def _loss_path(jaxpr) -> set:
    """Ids of the equations the first output depends on."""
    needed = {jaxpr.outvars[0]} if jaxpr.outvars and isinstance(jaxpr.outvars[0],
                                                                compat.Var) else set()
    path = set()
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars if not isinstance(v, compat.DropVar)):
            path.add(id(eqn))
            needed.update(v for v in eqn.invars if isinstance(v, compat.Var))
    return path


def _reshape_axis(shape_in, shape_out, k, inner, B) -> _Cls:
    """The example axis after a reshape. With ``pre`` entries before it on both sides, an
    output axis of size ``B * m`` holds the examples example-major (each example's entries
    stay one contiguous block of every prefix row), so it is the example axis with inner m."""
    pre = int(np.prod(shape_in[:k]))
    acc, j = 1, 0
    while j < len(shape_out) and acc < pre:
        acc *= shape_out[j]
        j += 1
    if acc != pre or j >= len(shape_out) or shape_out[j] % B:
        return UNKNOWN
    return _batched(j, shape_out[j] // B)


def _dot_axis(eqn, i, k, inner) -> _Cls:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if i == 0 else (rc, rb)
    if k in contract:
        return REDUCED
    if k in batch:
        return _batched(list(batch).index(k), inner)
    nb = len(lb)
    lhs_rank = len(_shape(eqn.invars[0]))
    lhs_free = [d for d in range(lhs_rank) if d not in lc and d not in lb]
    if i == 0:
        return _batched(nb + lhs_free.index(k), inner)
    rhs_rank = len(_shape(eqn.invars[1]))
    rhs_free = [d for d in range(rhs_rank) if d not in rc and d not in rb]
    return _batched(nb + len(lhs_free) + rhs_free.index(k), inner)


def _gather_axis(eqn, cls_in, shapes_in, out_shape) -> _Cls:
    dn = eqn.params["dimension_numbers"]
    op, idx = cls_in[0], cls_in[1]
    out_batch_dims = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
    op_batching = tuple(getattr(dn, "operand_batching_dims", ()))
    idx_batching = tuple(getattr(dn, "start_indices_batching_dims", ()))
    ivd = len(shapes_in[1]) - 1  # index_vector_dim: the last axis in jaxprs
    if idx.kind == "batched":
        k = idx.axis
        if k == ivd:
            return UNKNOWN
        if op.kind == "batched" and not (op.axis in op_batching and
                                         idx_batching[op_batching.index(op.axis)] == k):
            return UNKNOWN
        r = k - (1 if ivd < k else 0)
        return _batched(out_batch_dims[r], idx.inner)
    if op.kind == "batched":
        k = op.axis
        if k in dn.collapsed_slice_dims or k in dn.start_index_map or k in op_batching or \
                eqn.params["slice_sizes"][k] != shapes_in[0][k]:
            return UNKNOWN
        kept = [d for d in range(len(shapes_in[0]))
                if d not in dn.collapsed_slice_dims and d not in op_batching]
        return _batched(dn.offset_dims[kept.index(k)], op.inner)
    return UNKNOWN


# ---------------------------------------------------------------------------------- plans
def _float_dtype(*xs):
    """The dtype the norms are computed in: the widest float of ``xs``, at least float32."""
    widest = max((jnp.dtype(compat.typeof(x).dtype) for x in xs),
                 key=lambda d: d.itemsize if jnp.issubdtype(d, jnp.floating) else 0)
    return widest if jnp.issubdtype(widest, jnp.floating) and widest.itemsize >= 4 \
        else jnp.dtype(jnp.float32)


def _split_batch(x, axis: int, inner: int, B: int):
    """Split the example axis (``B * inner`` entries) into ``(B, inner)``."""
    shape = x.shape
    return x.reshape(shape[:axis] + (B, inner) + shape[axis + 1:])


def _pair_norms_sq(parts, d):
    """``Σ_h ||A_bh^T D_bh||²`` for ``A = [parts...]`` (each ``(B, H, T, C_k)``, joined along
    the last axis) and ``d (B, H, T, G)``: the pairwise ("ghost") form
    ``Σ_{t,s} (a_t·a_s)(d_t·d_s)`` or the direct product, whichever costs fewer flops. ``A`` is
    never joined: both forms are sums over its parts."""
    B, H, T, _ = d.shape
    C, G = sum(a.shape[-1] for a in parts), d.shape[-1]
    hi = lax.Precision.HIGHEST
    if T == 1:
        aa = sum(jnp.sum(a * a, axis=(2, 3)) for a in parts)
        return jnp.sum(aa * jnp.sum(d * d, axis=(2, 3)), axis=1)
    if T * (C + G) <= C * G:
        aa = sum(jnp.einsum("bhtc,bhsc->bhts", a, a, precision=hi) for a in parts)
        dd = jnp.einsum("bhtg,bhsg->bhts", d, d, precision=hi)
        return jnp.sum(aa * dd, axis=(1, 2, 3))
    total = 0
    for a in parts:
        g = jnp.einsum("bhtc,bhtg->bhcg", a, d, precision=hi)
        total = total + jnp.sum(g * g, axis=(1, 2, 3))
    return total


@dataclasses.dataclass
class _DensePlan:
    """``dot_general`` of per-example activations ``x`` (operand ``xi``) with parameter ``u``."""

    leaf: int
    xi: int
    x_perm: tuple      # x with the example axis split: (B, dot batch, inner + free, contracting)
    d_perm: tuple      # output cotangent, split likewise: (B, dot batch, inner + free, u free)
    k: int
    pk: int
    inner: int
    sizes: tuple       # (nb, T, C, G)
    B: int

    def apply(self, acc, invals, outs, cts_out, cts_in):
        x, d = invals[self.xi], cts_out[0]
        dt = _float_dtype(x, d)
        nb, T, C, G = self.sizes
        a = jnp.transpose(_split_batch(x.astype(dt), self.k, self.inner, self.B), self.x_perm)
        g = jnp.transpose(_split_batch(d.astype(dt), self.pk, self.inner, self.B), self.d_perm)
        acc.add(self.leaf, _pair_norms_sq([a.reshape(self.B, nb, T, C)],
                                          g.reshape(self.B, nb, T, G)))


def _dense_plan(an, eqn, cls_in, ui, out_cls):
    xi = 1 - ui
    x = cls_in[xi]
    if x.kind != "batched" or out_cls[0].kind != "batched" or not cls_in[ui].iso \
            or cls_in[ui].bcast:
        return None, None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, xb = (lc, lb) if xi == 0 else (rc, rb)
    uc, ub = (rc, rb) if xi == 0 else (lc, lb)
    sx, su = _shape(eqn.invars[xi]), _shape(eqn.invars[ui])
    k, inner = x.axis, x.inner
    if k in xc or k in xb:
        return None, None
    nb = len(lb)
    x_free = [d for d in range(len(sx)) if d not in xc and d not in xb]
    u_free = [d for d in range(len(su)) if d not in uc and d not in ub]
    if xi == 0:
        x_free_out = [nb + j for j in range(len(x_free))]
        u_free_out = [nb + len(x_free) + j for j in range(len(u_free))]
    else:
        u_free_out = [nb + j for j in range(len(u_free))]
        x_free_out = [nb + len(u_free) + j for j in range(len(x_free))]
    pk = x_free_out[x_free.index(k)]

    def shifted(d, at):  # index after splitting axis ``at`` into two
        return d if d < at else d + 1

    x_perm = ((k,) + tuple(shifted(d, k) for d in xb) + (k + 1,)
              + tuple(shifted(d, k) for d in x_free if d != k)
              + tuple(shifted(d, k) for d in xc))
    d_perm = ((pk,) + tuple(shifted(j, pk) for j in range(nb)) + (pk + 1,)
              + tuple(shifted(o, pk) for d, o in zip(x_free, x_free_out) if d != k)
              + tuple(shifted(o, pk) for o in u_free_out))
    nbs = int(np.prod([sx[d] for d in xb]))
    T = inner * int(np.prod([sx[d] for d in x_free if d != k]))
    C = int(np.prod([sx[d] for d in xc]))
    G = int(np.prod([su[d] for d in u_free]))
    return _DensePlan(cls_in[ui].leaves[0], xi, x_perm, d_perm, k, pk, inner, (nbs, T, C, G),
                      an.B), None


@dataclasses.dataclass
class _ConvPlan:
    """Convolution of per-example ``lhs`` with a parameter kernel: ``X_b`` holds the input
    patches (one row per output position, ``C_in · prod(kernel)`` columns), taken one kernel
    offset at a time (strided slices) and never joined."""

    leaf: int
    params: dict
    B: int

    def apply(self, acc, invals, outs, cts_out, cts_in):
        p = self.params
        x, d = invals[0], cts_out[0]
        dt = _float_dtype(x, d)
        dn = p["dimension_numbers"]
        filt = tuple(invals[1].shape[i] for i in dn.rhs_spec[2:])
        perm = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
        g = jnp.transpose(d.astype(dt), perm)                    # (B, out spatial..., C_out)
        g = g.reshape(self.B, 1, -1, g.shape[-1])
        T, G = g.shape[2], g.shape[3]
        c_in = x.shape[dn.lhs_spec[1]]
        C = c_in * int(np.prod(filt))
        padded = [n + lo + hi for n, (lo, hi) in zip((x.shape[i] for i in dn.lhs_spec[2:]),
                                                     p["padding"])]
        pairwise = T * (C + G) <= C * G and T > 1
        if pairwise and int(np.prod(padded)) ** 2 <= T * C and \
                all(r == 1 for r in p["lhs_dilation"]):
            # a_t·a_s from the Gram matrix of the padded input positions (smaller than the
            # patches): the sum over kernel offsets of its strided diagonal blocks
            aa = _patch_gram(x.astype(dt), p, filt).reshape(self.B, 1, T, T)
            dd = jnp.einsum("bhtg,bhsg->bhts", g, g, precision=lax.Precision.HIGHEST)
            acc.add(self.leaf, jnp.sum(aa * dd, axis=(1, 2, 3)))
            return
        taps = [a.reshape(self.B, 1, T, a.shape[-1])              # (B, 1, T, C) each
                for a in _patches(x.astype(dt), p, filt)]
        acc.add(self.leaf, _pair_norms_sq(taps, g))


def _patches(x, p, filt):
    """The convolution's input patches as one ``(N, out spatial..., C_in)`` array per kernel
    offset: the padded input (channels last) sliced with the window strides."""
    dn = p["dimension_numbers"]
    x = jnp.transpose(x, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
    if any(d != 1 for d in p["lhs_dilation"]):  # transposed convolutions: XLA's own unfold
        return [lax.conv_general_dilated_patches(
            x, filt, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
            dimension_numbers=lax.conv_dimension_numbers(
                x.shape, (1, 1) + tuple(filt), _channels_last(len(filt))),
            precision=lax.Precision.HIGHEST)]
    strides, dil = tuple(p["window_strides"]), tuple(p["rhs_dilation"])
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in p["padding"]] + [(0, 0, 0)])
    spatial = x.shape[1:-1]
    out = [(n - (f - 1) * r - 1) // s + 1 for n, f, r, s in zip(spatial, filt, dil, strides)]
    cols = []
    for offset in itertools.product(*(range(f) for f in filt)):
        start = [0] + [o * r for o, r in zip(offset, dil)] + [0]
        limit = ([x.shape[0]] + [b + (m - 1) * s + 1 for b, m, s in zip(start[1:], out, strides)]
                 + [x.shape[-1]])
        cols.append(lax.slice(x, start, limit, (1,) + strides + (1,)))
    return cols


def _patch_gram(x, p, filt):
    """``(N, T, T)``: the dot products of every two input patches of the convolution, from
    the Gram matrix of the padded input's positions (``(N, P, P)``, ``P`` positions)."""
    dn = p["dimension_numbers"]
    x = jnp.transpose(x, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
    strides, dil = tuple(p["window_strides"]), tuple(p["rhs_dilation"])
    zero = jnp.zeros((), x.dtype)
    x = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in p["padding"]] + [(0, 0, 0)])
    n, spatial, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    flat = x.reshape(n, -1, c)
    gram = jnp.einsum("npc,nqc->npq", flat, flat, precision=lax.Precision.HIGHEST)
    gram = gram.reshape((n,) + spatial + spatial)
    nd = len(spatial)
    out = [(m - (f - 1) * r - 1) // s + 1 for m, f, r, s in zip(spatial, filt, dil, strides)]
    total = 0
    for offset in itertools.product(*(range(f) for f in filt)):
        start = [o * r for o, r in zip(offset, dil)]
        limit = [b + (m - 1) * s + 1 for b, m, s in zip(start, out, strides)]
        block = lax.slice(gram, [0] + start + start, [n] + limit + limit,
                          (1,) + strides + strides)
        total = total + block
    t = int(np.prod(out))
    return jnp.reshape(total, (n, t, t)) if nd else total


def _channels_last(nd: int) -> tuple:
    spatial = "HWDXYZ"[:nd]
    return (f"N{spatial}C", f"OI{spatial}", f"N{spatial}C")


def _conv_plan(an, eqn, cls_in, ui, out_cls):
    p = eqn.params
    if ui != 1 or cls_in[0].kind != "batched" or cls_in[0].inner != 1 or not cls_in[1].iso \
            or cls_in[1].bcast or out_cls[0].kind != "batched":
        return None, None
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        return None, (f"grouped convolution at {compat.user_frame(eqn)} (exact per-example "
                      "gradients for it)")
    return _ConvPlan(cls_in[1].leaves[0], dict(p), an.B), None


@dataclasses.dataclass
class _EmbedPlan:
    """``gather`` of parameter table rows at per-example indices (an embedding lookup)."""

    leaf: int
    k: int
    inner: int
    vocab: int
    clip: bool
    B: int

    def apply(self, acc, invals, outs, cts_out, cts_in):
        idx, d = invals[1], cts_out[0]                     # idx (..., 1), d (..., D)
        dt = _float_dtype(d)
        idx = idx[..., 0]
        idx = jnp.moveaxis(_split_batch(idx, self.k, self.inner, self.B), self.k, 0)
        d = jnp.moveaxis(_split_batch(d.astype(dt), self.k, self.inner, self.B), self.k, 0)
        idx = idx.reshape(self.B, -1)
        d = d.reshape(self.B, idx.shape[1], -1)
        if self.clip:
            idx = jnp.clip(idx, 0, self.vocab - 1)
        valid = (idx >= 0) & (idx < self.vocab)
        if idx.shape[1] == 1:
            acc.add(self.leaf, jnp.sum(d * d, axis=(1, 2)) * valid[:, 0])
            return
        same = (idx[:, :, None] == idx[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        dd = jnp.einsum("btd,bsd->bts", d, d, precision=lax.Precision.HIGHEST)
        acc.add(self.leaf, jnp.sum(jnp.where(same, dd, jnp.zeros((), dt)), axis=(1, 2)))


def _embed_plan(an, eqn, cls_in, ui, out_cls):
    dn, p = eqn.params["dimension_numbers"], eqn.params
    table = _shape(eqn.invars[0])
    idx = cls_in[1]
    standard = (ui == 0 and len(table) == 2 and tuple(dn.collapsed_slice_dims) == (0,)
                and tuple(dn.start_index_map) == (0,)
                and tuple(p["slice_sizes"]) == (1, table[1])
                and not tuple(getattr(dn, "operand_batching_dims", ()))
                and _shape(eqn.invars[1])[-1] == 1 and idx.kind == "batched"
                and idx.axis != len(_shape(eqn.invars[1])) - 1
                and tuple(dn.offset_dims) == (len(_shape(eqn.outvars[0])) - 1,)
                and cls_in[0].iso and not cls_in[0].bcast)
    if not standard:
        return None, None
    mode = str(p.get("mode", ""))
    return _EmbedPlan(cls_in[0].leaves[0], idx.axis, idx.inner, table[0], "CLIP" in mode,
                      an.B), None


@dataclasses.dataclass
class _ElementwisePlan:
    """A parameter broadcast over the examples (explicitly, or by a size-1 axis) and combined
    elementwise: its full-shape cotangent, summed per example over the broadcast axes."""

    leaf: int
    ui: int
    rule: Callable
    params: dict
    out_shape: tuple
    k: int
    inner: int
    sum_axes: tuple      # after splitting the example axis, excluding it
    B: int

    def apply(self, acc, invals, outs, cts_out, cts_in):
        u = invals[self.ui]
        full = list(invals)
        full[self.ui] = jnp.broadcast_to(u, self.out_shape)
        ct = self.rule(cts_out[0], *full, out=outs[0], **self.params)[self.ui]
        if ct is None:
            return
        dt = _float_dtype(ct)
        g = _split_batch(ct.astype(dt), self.k, self.inner, self.B)
        g = jnp.sum(g, axis=self.sum_axes) if self.sum_axes else g
        g = jnp.moveaxis(g, self.k - sum(a < self.k for a in self.sum_axes), 0)
        acc.add(self.leaf, jnp.sum(jnp.reshape(g * g, (self.B, -1)), axis=1))


def _elementwise_plan(an, eqn, cls_in, ui, out_cls):
    u = cls_in[ui]
    rule = registry.vjp_rules.get(eqn.primitive)
    out = out_cls[0]
    if rule is None or not u.iso or len(eqn.outvars) != 1 or out.kind != "batched":
        return None, None
    su, so = _shape(eqn.invars[ui]), _shape(eqn.outvars[0])
    if len(su) != len(so):
        return None, None
    k, inner = out.axis, out.inner
    broadcast = set(u.bcast) | {d for d in range(len(so)) if su[d] == 1 and so[d] != 1}
    if k not in broadcast and so[k] != 1:
        return None, None
    axes = tuple(sorted((d if d < k else d + 1) for d in broadcast if d != k))
    if inner > 1:
        axes = tuple(sorted(axes + (k + 1,)))
    return _ElementwisePlan(u.leaves[0], ui, rule, dict(eqn.params), so, k, inner, axes,
                            an.B), None


def _make_plan(an, eqn, cls_in, ui, out_cls):
    prim = eqn.primitive
    if prim is prims.dot_general_p:
        return _dense_plan(an, eqn, cls_in, ui, out_cls)
    if prim is prims.conv_general_dilated_p:
        return _conv_plan(an, eqn, cls_in, ui, out_cls)
    if prim is prims.gather_p:
        return _embed_plan(an, eqn, cls_in, ui, out_cls)
    if prim in ELEMENTWISE:
        return _elementwise_plan(an, eqn, cls_in, ui, out_cls)
    return None, None


@dataclasses.dataclass
class _CallPlan:
    """A ``custom_vjp``/``custom_jvp`` call taking parameters: its primal function is re-run
    in the backward pass, under the observer, with the call's output cotangents."""

    jaxpr: Any
    consts: list
    plans: dict
    cls_in: list

    def apply(self, acc, invals, outs, cts_out, cts_in):
        active = [c.kind == "param" for c in self.cls_in]
        child = _NormObserver(self.plans, acc)
        with core.observing(child):
            _, backward, active_out = core.vjp_jaxpr(self.jaxpr, self.consts, list(invals),
                                                     active)
            backward([c if a else None for c, a in zip(cts_out, active_out)])


# ------------------------------------------------------------------------------- observer
class _Accumulator:
    """Per-leaf sums of squared per-example norm contributions, ``(B,)`` each."""

    def __init__(self):
        self.sq: dict[int, Any] = {}

    def add(self, leaf: int, sq) -> None:
        self.sq[leaf] = sq if leaf not in self.sq else self.sq[leaf] + sq


class _NormObserver:
    """Runs the plans of the equations it sees pulled back (see ``bpkit.engine.core``);
    optionally keeps the cotangents flowing into the per-example reducers (for DP-SGD)."""

    def __init__(self, plans: dict, acc: _Accumulator, reducers: dict | None = None):
        self.plans, self.acc = plans, acc
        self.frames: list = []
        self.reducers = reducers or {}     # id(eqn) -> operand indices
        self.reducer_cts: dict = {}        # (id(eqn), operand) -> cotangent

    @contextlib.contextmanager
    def nested(self, eqn, backward: bool):
        self.frames.append(eqn)
        try:
            yield
        finally:
            self.frames.pop()

    def forward(self, eqn, invals, outs):
        pass

    def backward(self, eqn, invals, outs, cts_out, cts_in):
        key = tuple(id(f) for f in self.frames) + (id(eqn),)
        for plan in self.plans.get(key, ()):
            plan.apply(self.acc, invals, outs, cts_out, cts_in)
        if not self.frames and id(eqn) in self.reducers:
            for i in self.reducers[id(eqn)]:
                self.reducer_cts[(id(eqn), i)] = cts_in[i]

    def fork(self, backward_only: bool):
        return None  # parameters inside scans and conds fall back: nothing to see there


# -------------------------------------------------------------------------------- driver
@dataclasses.dataclass
class _Prepared:
    traced: Any
    plans: dict
    ghost: dict          # leaf -> plan
    fallback: dict       # leaf -> why
    reducers: list       # (eqn, operand)
    B: int


_prepared_cache: dict = {}


def _prepare(traced, flat_args, wrt: Sequence[int], axes: Sequence[int | None]) -> _Prepared:
    key = (id(traced.jaxpr), tuple(wrt), tuple(axes))
    hit = _prepared_cache.get(key)
    if hit is not None and hit.traced is traced:
        return hit
    sizes = {np.shape(x)[a] for x, a in zip(flat_args, axes) if a is not None}
    if len(sizes) != 1:
        raise PerExampleError(
            "per-example gradients need the batch: the non-differentiated arguments must "
            f"carry the examples along batch_axis with one size (found sizes {sorted(sizes)}); "
            "pass batch_axis=None for an argument without examples.")
    B = sizes.pop()
    cls = []
    for i, (x, a) in enumerate(zip(flat_args, axes)):
        if i in wrt and compat.is_inexact(compat.typeof(x)):
            cls.append(_param(i))
        elif a is not None:
            cls.append(_batched(a))
        else:
            cls.append(CONST)
    an = _Analysis(B)
    plans: dict = {}
    an.run(traced.jaxpr, cls, (), plans, top=True)
    uses: dict[int, list[_Use]] = {}
    for u in an.uses:
        uses.setdefault(u.leaf, []).append(u)
    ghost, fallback = {}, {}
    for leaf, us in uses.items():
        if len(us) == 1 and us[0].plan is not None:
            ghost[leaf] = us[0].plan
        else:
            fallback[leaf] = next((u.why for u in us if u.plan is None),
                                  f"it is used {len(us)} times")
    # Only ghost plans of ghost leaves run; a leaf that also falls back keeps none.
    for key in list(plans):
        kept = [p for p in plans[key] if _plan_leaf(p) is None or _plan_leaf(p) in ghost]
        if kept:
            plans[key] = kept
        else:
            del plans[key]
    prepared = _Prepared(traced, plans, ghost, fallback, an.reducers, B)
    if len(_prepared_cache) > 64:
        _prepared_cache.clear()
    _prepared_cache[key] = prepared
    return prepared


def _plan_leaf(plan):
    return getattr(plan, "leaf", None)


def _batch_axes(args, argnums: tuple, batch_axis) -> list:
    """One entry per flat leaf of ``(args, {})``: the example axis, or None."""
    if isinstance(batch_axis, (tuple, list)):
        if len(batch_axis) != len(args):
            raise ValueError(f"batch_axis has {len(batch_axis)} entries for {len(args)} "
                             "positional arguments; give one per argument (None: no examples).")
        per_arg = list(batch_axis)
    else:
        per_arg = [batch_axis] * len(args)
    axes = []
    for n, a in enumerate(args):
        ax = None if n in argnums else per_arg[n]
        for leaf in jax.tree_util.tree_leaves(a):
            axes.append(None if ax is None else ax % max(np.ndim(leaf), 1))
    return axes


def _fallback_norms_sq(fun, args, kwargs, in_tree, flat_args, leaves: list[int],
                       axes: list) -> dict:
    """Exact per-example squared norms of the ``leaves``' gradients: ``vmap`` over the
    examples of bpkit's gradient of the loss on a one-example batch, for those leaves only."""
    if not leaves:
        return {}

    def one(values, example_leaves):
        flat = list(flat_args)
        for i, v in zip(leaves, values):
            flat[i] = v
        it = iter(example_leaves)
        for i, a in enumerate(axes):
            if a is not None:
                flat[i] = jnp.expand_dims(next(it), a)
        a, kw = jax.tree_util.tree_unflatten(in_tree, flat)
        return fun(*a, **kw)

    batched = [x for x, a in zip(flat_args, axes) if a is not None]
    in_axes = [a for a in axes if a is not None]
    grads = jax.vmap(api.grad(one), in_axes=(None, in_axes))(
        [flat_args[i] for i in leaves], batched)
    return {i: jnp.sum(jnp.reshape(jnp.square(g.astype(_float_dtype(g))), (g.shape[0], -1)),
                       axis=1)
            for i, g in zip(leaves, grads)}


def _setup(fun, args, kwargs, argnums, batch_axis):
    argnums_tuple = api._check_argnums(argnums)
    if max(argnums_tuple) >= len(args):
        raise TypeError(f"argnums={argnums} needs at least {max(argnums_tuple) + 1} "
                        f"positional arguments, got {len(args)}.")
    flat_args, in_tree = jax.tree_util.tree_flatten((args, kwargs))
    flat_args = [compat.as_array(x) for x in flat_args]
    spans = api._leaf_spans(args)
    wrt = sorted({i for n in argnums_tuple for i in range(*spans[n])})
    axes = _batch_axes(args, argnums_tuple, batch_axis)
    axes += [None] * (len(flat_args) - len(axes))  # keyword arguments: no examples
    traced = core.trace(fun, flat_args, in_tree)
    return argnums_tuple, flat_args, in_tree, spans, wrt, axes, traced


def _norms(prepared, fun, args, kwargs, in_tree, flat_args, axes, acc, loss_reduction):
    """Per-leaf per-example squared norms: ghost (scaled back from the batch loss to each
    example's own loss) and fallback."""
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    scale = float(prepared.B) ** 2 if loss_reduction == "mean" else 1.0
    sq = {leaf: v * scale for leaf, v in acc.sq.items()}
    sq.update(_fallback_norms_sq(fun, args, kwargs, in_tree, flat_args,
                                 sorted(prepared.fallback), axes))
    return sq


def _assemble(sq: dict, flat_args, args, argnums_tuple, spans, argnums, B, dtype):
    zero = jnp.zeros((B,), dtype)
    total = zero
    per_arg = []
    for n in argnums_tuple:
        lo, hi = spans[n]
        leaves = []
        for j in range(lo, hi):
            s = sq.get(j, zero)
            total = total + s.astype(dtype)
            leaves.append(jnp.sqrt(s).astype(dtype))
        per_arg.append(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args[n]),
                                                    leaves))
    leaf_norms = per_arg[0] if isinstance(argnums, int) else tuple(per_arg)
    return jnp.sqrt(total), leaf_norms


def _value_dtype(value):
    return _float_dtype(value)


def per_example_grad_norms(fun: Callable, argnums: int | Sequence[int] = 0,
                           batch_axis: int | Sequence[int | None] = 0, *,
                           loss_reduction: str = "mean") -> Callable:
    """``per_example_grad_norms(loss)(params, batch, ...) -> ExampleGradNorms(norms,
    leaf_norms)``: the norm of each example's gradient of ``loss`` with respect to
    ``argnums``, globally (``(B,)``) and per leaf.

    ``loss(params, batch)`` must return the ``mean`` (``loss_reduction="mean"``) or ``sum``
    over the batch of independent per-example losses; "each example's gradient" is then the
    gradient of ``loss`` on a batch holding that example alone (what ``jax.vmap`` of
    ``jax.grad`` over one-example batches gives). ``batch_axis``: the example axis of every
    non-differentiated positional argument (an int), or one entry per positional argument
    (``None``: that argument has no examples, e.g. a PRNG key). Keyword arguments have none.
    """
    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        value, norms, leaf_norms = _run_norms(fun, args, kwargs, argnums, batch_axis,
                                              loss_reduction)
        return ExampleGradNorms(norms, leaf_norms)

    return wrapped


def _run_norms(fun, args, kwargs, argnums, batch_axis, loss_reduction):
    argnums_tuple, flat_args, in_tree, spans, wrt, axes, traced = _setup(
        fun, args, kwargs, argnums, batch_axis)
    prepared = _prepare(traced, flat_args, wrt, axes)
    acc = _Accumulator()
    obs = _NormObserver(prepared.plans, acc)
    active = [i in wrt and compat.is_inexact(compat.typeof(x)) for i, x in enumerate(flat_args)]
    with core.observing(obs):
        outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active)
        value = _check_scalar(outs[0])
        backward([jnp.ones((), value.dtype)] + [None] * (len(outs) - 1))
    sq = _norms(prepared, fun, args, kwargs, in_tree, flat_args, axes, acc, loss_reduction)
    norms, leaf_norms = _assemble(sq, flat_args, args, argnums_tuple, spans, argnums,
                                  prepared.B, _value_dtype(value))
    return value, norms, leaf_norms


def _check_scalar(value):
    aval = compat.typeof(value)
    if aval.shape != () or not jnp.issubdtype(aval.dtype, jnp.floating):
        raise TypeError("per-example gradient norms need a loss returning a real scalar; "
                        f"this one returned {aval.str_short()}.")
    return value


def clipped_value_and_grad(fun: Callable, l2_clip: float, argnums: int | Sequence[int] = 0,
                           batch_axis: int | Sequence[int | None] = 0, *,
                           loss_reduction: str = "mean", has_aux: bool = False) -> Callable:
    """DP-SGD's clipped gradient: ``f(*args) -> (value, grad, norms)`` (``((value, aux),
    grad, norms)`` with ``has_aux``) where ``grad = r · Σ_b min(1, l2_clip / ||g_b||) g_b``
    (``r = 1/B`` for a mean loss, 1 for a sum: the clipped counterpart of the loss's own
    gradient), ``g_b`` each example's gradient and ``norms`` their norms ``(B,)``.

    One forward pass and two backward passes: the first gives the norms (ghost norms where
    possible), the second is seeded at the per-example losses with the clip factors.
    """
    if not l2_clip > 0:
        raise ValueError(f"l2_clip must be a positive number, got {l2_clip!r}.")

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        argnums_tuple, flat_args, in_tree, spans, wrt, axes, traced = _setup(
            fun, args, kwargs, argnums, batch_axis)
        prepared = _prepare(traced, flat_args, wrt, axes)
        if not prepared.reducers:
            raise PerExampleError(
                "DP-SGD needs the per-example losses: no equation of the loss sums over the "
                "examples where bpkit can see it (a reduction inside a jit or a loop, or an "
                "example axis lost by a reshape). Average the per-example losses at the top "
                "level of the loss function (jnp.mean(per_example_losses)).")
        # The per-example losses (inputs of the reducers) become extra outputs, so that a
        # second backward pass can be seeded there.
        extra = [eqn.invars[i] for eqn, i, _ in prepared.reducers]
        jaxpr = compat.with_outvars(traced.jaxpr, list(traced.jaxpr.outvars) + extra)
        acc = _Accumulator()
        reducer_ops: dict = {}
        for eqn, i, _ in prepared.reducers:
            reducer_ops.setdefault(id(eqn), []).append(i)
        obs = _NormObserver(prepared.plans, acc, reducer_ops)
        active = [i in wrt and compat.is_inexact(compat.typeof(x))
                  for i, x in enumerate(flat_args)]
        n_out = len(traced.jaxpr.outvars)
        with core.observing(obs):
            outs, backward, active_out = core.vjp_jaxpr(jaxpr, traced.consts, flat_args,
                                                        active)
            value = _check_scalar(outs[0])
            backward([jnp.ones((), value.dtype)] + [None] * (len(outs) - 1))
        sq = _norms(prepared, fun, args, kwargs, in_tree, flat_args, axes, acc,
                    loss_reduction)
        dtype = _value_dtype(value)
        norms, _ = _assemble(sq, flat_args, args, argnums_tuple, spans, argnums, prepared.B,
                             dtype)
        factors = jnp.minimum(1.0, l2_clip / jnp.maximum(norms, 1e-30)).astype(dtype)
        seeds = []
        for eqn, i, c in prepared.reducers:
            ct = obs.reducer_cts.get((id(eqn), i))
            if ct is None or c.kind != "batched":
                seeds.append(None)
                continue
            # c_b times the cotangent, along the example axis (split as (B, inner))
            shape = [1] * (len(ct.shape) + 1)
            shape[c.axis] = prepared.B
            g = _split_batch(ct, c.axis, c.inner, prepared.B) * factors.reshape(shape).astype(
                ct.dtype)
            seeds.append(g.reshape(ct.shape))
        cts = backward([None] * n_out + seeds)
        grad = api.gradients_of(cts, flat_args, spans, args, argnums_tuple, argnums)
        out_tree = traced.out_tree
        if has_aux:
            _, aux = api._split_aux(out_tree, outs[:n_out], True, "clipped_value_and_grad")
            return (value, aux), grad, norms
        return value, grad, norms

    return wrapped


def plan_summary(fun: Callable, argnums: int = 0, batch_axis=0) -> Callable:
    """``plan_summary(loss)(params, batch) -> {leaf path: "ghost: dense" | "exact: why"}``:
    how each parameter leaf's per-example norm is computed (for docs and debugging)."""
    def wrapped(*args, **kwargs):
        argnums_tuple, flat_args, in_tree, spans, wrt, axes, traced = _setup(
            fun, args, kwargs, argnums, batch_axis)
        prepared = _prepare(traced, flat_args, wrt, axes)
        lo, _ = spans[argnums_tuple[0]]
        out = {}
        paths = jax.tree_util.tree_flatten_with_path(args[argnums_tuple[0]])[0]
        for j, (path, _) in enumerate(paths):
            leaf = lo + j
            name = jax.tree_util.keystr(path)
            if leaf in prepared.ghost:
                out[name] = "ghost: " + type(prepared.ghost[leaf]).__name__[1:-4].lower()
            elif leaf in prepared.fallback:
                out[name] = "exact: " + prepared.fallback[leaf]
            else:
                out[name] = "unused"
        return out
    return wrapped


__all__ = ["per_example_grad_norms", "clipped_value_and_grad", "ExampleGradNorms",
           "PerExampleError", "plan_summary"]

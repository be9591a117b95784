"""Where a gradient went NaN: ``nonfinite_origin(fun)``.

bpkit runs the backward sweep itself, equation by equation, so it can watch every cotangent.
``nonfinite_origin(loss)(params, batch)`` returns ``(value, grad, report)`` like
``value_and_grad`` plus a report that names

* the **backward origin**: the first equation of the backward sweep whose output cotangent was
  finite and whose input cotangent is not (the place a NaN or inf is *born* in the gradient,
  not one of the many places it flows through afterwards), and
* the **forward origin**: the first input or equation of the forward pass holding a
  non-finite value,

each with the primitive, the user's ``file:line``, the ``jax.named_scope`` path (the layer),
the operand values at the first bad element and a sentence explaining the derivative
(``sqrt at x = 0: its derivative 1/(2·sqrt(x)) is infinite``). ``report`` is ``None`` when
the value and the gradient are finite.

How it works: an equation observer (``bpkit.engine.core.observing``) sees each equation with
its inputs, outputs and cotangents. For each one it computes, as ordinary array operations, a
flag (finite in, non-finite out) and the first bad position, and folds them into a small fixed
state: found, equation index, position, operand values, counts. Equations are numbered at
trace time, so the state is all the computation carries out: it runs the same eagerly or under
``jax.jit`` (no host round trip per equation), follows into jit, remat, scan and cond bodies
(``fork``/``join``: a scan's per-step states leave the loop as extra outputs), and costs nothing
when not used (the engine checks for an observer at trace time only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np

from bpkit.engine import api, compat, core

MAX_SCANS = 4        # nesting depth of scans whose step is reported
N_OPERANDS = 4       # operands whose value at the bad position is reported
# Layout of ``Origin.values``: the bad value, the cotangent that arrived (backward), the
# primal output at the same position, then the operands.
_BAD, _CT_OUT, _OUT, _OPS = 0, 1, 2, 3


def _value_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class Origin(NamedTuple):
    """The dynamic half of a report for one pass (arrays; a pytree).

    ``found``: a non-finite value appeared; ``index``: the entry of the first one in the
    report's table; ``position``: flat index of the first bad element of the offending value;
    ``steps``: the step of each enclosing scan (outermost first, -1 unused); ``values``: see
    ``_BAD``...; ``operand``: which input's cotangent (backward) or which output (forward) is
    bad; ``nonfinite_operands``: bit j set when operand j already held a NaN/inf; ``count``:
    non-finite elements of the offending value; ``total``: equations with a non-finite result.
    """

    found: Any
    index: Any
    position: Any
    steps: Any
    values: Any
    operand: Any
    nonfinite_operands: Any
    count: Any
    total: Any

    @classmethod
    def empty(cls) -> "Origin":
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        return cls(jnp.asarray(False), i32(-1), i32(-1), jnp.full((MAX_SCANS,), -1, jnp.int32),
                   jnp.full((_OPS + N_OPERANDS,), jnp.nan, _value_dtype()), i32(-1), i32(0),
                   i32(0), i32(0))


@dataclasses.dataclass(frozen=True)
class Entry:
    """The static half: one observed equation (or input) of a pass."""

    primitive: str                  # primitive name, or "input"
    where: str                      # file:line (function), or the input's path
    scope: str                      # jax.named_scope path ("" when none)
    within: tuple                   # enclosing equations, outermost first: (primitive, where)
    operands: tuple                 # operand types, e.g. ("f32[32,10]", "f32[]")
    outputs: tuple                  # output types
    explain_key: Any = None         # the primitive object (explanation table), or None


def _type_str(x) -> str:
    aval = compat.typeof(x)
    return aval.str_short() if hasattr(aval, "str_short") else str(aval)


def _is_float(x) -> bool:
    return x is not None and compat.is_inexact(compat.typeof(x))


def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _value_at(x, position, shape):
    """``x``'s element at flat ``position`` of an array of ``shape`` (NaN if it has another
    shape; its one element if it is a scalar), as the report's float dtype."""
    dtype = None if x is None else compat.typeof(x).dtype
    if dtype is None or not any(jnp.issubdtype(dtype, k) for k in (jnp.inexact, jnp.integer,
                                                                    jnp.bool_)):
        return jnp.asarray(jnp.nan, _value_dtype())
    x = jnp.real(x) if jnp.iscomplexobj(x) else x
    if tuple(np.shape(x)) == tuple(shape):
        v = jnp.ravel(x)[position]
    elif np.size(x) == 1:
        v = jnp.ravel(x)[0]
    else:
        return jnp.asarray(jnp.nan, _value_dtype())
    return v.astype(_value_dtype())


def _nonfinite_bits(invals) -> Any:
    bits = jnp.asarray(0, jnp.int32)
    for j, x in enumerate(invals[:N_OPERANDS]):
        if _is_float(x):
            bits = bits | jnp.where(_all_finite(x), 0, 1 << j).astype(jnp.int32)
    return bits


def _candidate(bad_value, invals, ct_out, out, operand: int):
    """The ``Origin`` fields describing ``bad_value`` (a cotangent or an output)."""
    bad = ~jnp.isfinite(bad_value)
    position = jnp.argmax(jnp.ravel(bad)).astype(jnp.int32)
    shape = np.shape(bad_value)
    values = [_value_at(bad_value, position, shape), _value_at(ct_out, position, shape),
              _value_at(out, position, shape)]
    ops = list(invals[:N_OPERANDS]) + [None] * (N_OPERANDS - len(invals[:N_OPERANDS]))
    values += [_value_at(x, position, shape) for x in ops]
    return dict(position=position, values=jnp.stack(values),
                operand=jnp.asarray(operand, jnp.int32),
                count=jnp.sum(bad).astype(jnp.int32))


def _select_first(cands: list[tuple[Any, dict]]):
    """``(any_bad, fields)`` of the first candidate whose flag is set."""
    flag, fields = cands[-1]
    for f, c in reversed(cands[:-1]):
        fields = jax.tree_util.tree_map(lambda a, b: jnp.where(f, a, b), c, fields)
        flag = flag | f
    return flag, fields


class _PassLog:
    """Static table and dynamic state of one pass (forward or backward)."""

    def __init__(self):
        self.table: list[Entry] = []
        self.state = Origin.empty()

    def record(self, entry: Entry, hit, fields: dict, *, counts: bool = True, bad=None):
        """Add ``entry``; if ``hit`` (dynamic) and nothing was found before, it is the origin.
        ``bad`` (default ``hit``) counts the entry towards ``total``."""
        k = len(self.table)
        self.table.append(entry)
        s = self.state
        first = hit & ~s.found
        new = s._replace(index=jnp.asarray(k, jnp.int32), steps=jnp.full((MAX_SCANS,), -1,
                                                                          jnp.int32),
                         nonfinite_operands=fields.pop("nonfinite_operands", s.nonfinite_operands),
                         **fields)
        merged = jax.tree_util.tree_map(lambda a, b: jnp.where(first, a, b), new, s)
        total = s.total + ((hit if bad is None else bad) & counts).astype(jnp.int32)
        self.state = merged._replace(found=s.found | hit, total=total)

    def merge(self, entries: Sequence[Entry], origin: Origin):
        """Append a child's ``entries`` whose state (already reduced to one) is ``origin``."""
        offset = len(self.table)
        self.table.extend(entries)
        s = self.state
        first = origin.found & ~s.found
        new = origin._replace(index=origin.index + offset)
        merged = jax.tree_util.tree_map(lambda a, b: jnp.where(first, a, b), new, s)
        self.state = merged._replace(found=s.found | origin.found, total=s.total + origin.total)


# Equations whose rule evaluates nested equations that are observed themselves: not counted
# in ``total`` (their nested equations are).
_CONTAINERS = {p for p in (getattr(prims, "pjit_p", None), getattr(prims, "jit_p", None),
                           prims.closed_call_p, prims.remat_p, prims.scan_p, prims.cond_p,
                           prims.custom_jvp_call_p) if p is not None}


class NonfiniteObserver:
    """The equation observer behind ``nonfinite_origin`` (see ``bpkit.engine.core``)."""

    def __init__(self, backward_only: bool = False):
        self.fwd, self.bwd = _PassLog(), _PassLog()
        self.frames: list[tuple[Any, bool]] = []  # (eqn, in its backward rule)
        self.backward_only = backward_only

    # -- the engine's hooks ---------------------------------------------------------------
    @contextlib.contextmanager
    def nested(self, eqn, backward: bool):
        self.frames.append((eqn, backward))
        try:
            yield
        finally:
            self.frames.pop()

    def _recomputing(self) -> bool:
        """Inside a pullback, forward passes are recomputations (remat): not observed."""
        return self.backward_only or any(b for _, b in self.frames)

    def _entry(self, eqn, invals, outs) -> Entry:
        within = tuple((f.primitive.name, compat.user_frame(f)) for f, _ in self.frames)
        scopes = [compat.name_stack(f) for f, _ in self.frames] + [compat.name_stack(eqn)]
        return Entry(eqn.primitive.name, compat.user_frame(eqn),
                     "/".join(s for s in scopes if s), within,
                     tuple(_type_str(x) for x in invals), tuple(_type_str(x) for x in outs),
                     eqn.primitive)

    def forward(self, eqn, invals, outs):
        if self._recomputing():
            return
        floats = [(o, x) for o, x in enumerate(outs) if _is_float(x)]
        if not floats:
            return
        cands = [(~_all_finite(x), _candidate(x, invals, None, None, o)) for o, x in floats]
        hit, fields = _select_first(cands)
        fields["nonfinite_operands"] = _nonfinite_bits(invals)
        self.fwd.record(self._entry(eqn, invals, outs), hit, fields,
                        counts=eqn.primitive not in _CONTAINERS)

    def backward(self, eqn, invals, outs, cts_out, cts_in):
        cts_out = [c for c in cts_out if _is_float(c)]
        cands = [(~_all_finite(ct), _candidate(ct, invals, cts_out[0] if cts_out else None,
                                               outs[0] if outs else None, i))
                 for i, ct in enumerate(cts_in) if _is_float(ct)]
        if not cands:
            return
        out_ok = jnp.asarray(True)
        for c in cts_out:
            out_ok = out_ok & _all_finite(c)
        bad, fields = _select_first(cands)
        fields["nonfinite_operands"] = _nonfinite_bits(invals)
        self.bwd.record(self._entry(eqn, invals, outs), out_ok & bad, fields,
                        counts=eqn.primitive not in _CONTAINERS, bad=bad)

    def fork(self, backward_only: bool):
        return NonfiniteObserver(backward_only=backward_only or self._recomputing())

    def state(self, phase: str) -> list:
        return list(self._log(phase).state)

    def _log(self, phase: str) -> _PassLog:
        return self.fwd if phase == "forward" else self.bwd

    def _prefix(self, entries: Sequence[Entry]) -> list[Entry]:
        within = tuple((f.primitive.name, compat.user_frame(f)) for f, _ in self.frames)
        scope = "/".join(s for s in (compat.name_stack(f) for f, _ in self.frames) if s)
        return [dataclasses.replace(
            e, within=within + e.within,
            scope="/".join(s for s in (scope, e.scope) if s)) for e in entries]

    def join_scan(self, child: "NonfiniteObserver", phase: str, stacked: list, *,
                  reverse: bool):
        """Fold a scan body's per-step states (``stacked``: leading axis = step) into this
        observer: the first step (in the order the loop ran) that found something wins."""
        if phase == "forward" and self._recomputing():
            return
        per_step = Origin(*stacked)
        length = per_step.found.shape[0]
        order = jnp.arange(length)[::-1] if reverse else jnp.arange(length)
        found_in_order = per_step.found[order]
        t = order[jnp.argmax(found_in_order)]
        pick = jax.tree_util.tree_map(lambda a: a[t], per_step)
        steps = jnp.concatenate([t[None].astype(jnp.int32), pick.steps[:-1]])
        origin = pick._replace(found=jnp.any(per_step.found), steps=steps,
                               total=jnp.sum(per_step.total).astype(jnp.int32))
        self._log(phase).merge(self._prefix(child._log(phase).table), origin)

    def join_switch(self, children: Sequence["NonfiniteObserver"], phase: str, state: list,
                    index):
        """Fold the state of the branch ``index`` took (``state``) into this observer."""
        origin = Origin(*state)
        sizes = [len(c._log(phase).table) for c in children]
        offsets = jnp.asarray(np.cumsum([0] + sizes[:-1]), jnp.int32)
        entries = [e for c in children for e in c._log(phase).table]
        branch = jnp.clip(index, 0, len(children) - 1)
        origin = origin._replace(index=origin.index + offsets[branch])
        self._log(phase).merge(self._prefix(entries), origin)

    # -- inputs -----------------------------------------------------------------------------
    def inputs(self, names: Sequence[str], values: Sequence[Any]):
        """Check the function's inputs (and closed-over constants) before its first equation."""
        for name, x in zip(names, values):
            if not _is_float(x):
                continue
            fields = _candidate(x, [x], None, None, 0)
            fields["nonfinite_operands"] = jnp.asarray(0, jnp.int32)
            self.fwd.record(Entry("input", name, "", (), (_type_str(x),), (_type_str(x),)),
                            ~_all_finite(x), fields)


# ----------------------------------------------------------------------------- the report
def _fmt(v: float) -> str:
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.4g}"


def _kind(v: float) -> str:
    return "NaN" if np.isnan(v) else ("inf" if v > 0 else "-inf")


_UNARY = ("x",)
_BINARY = ("x", "y")
# primitive -> (operand names, what goes wrong in its derivative). Where the derivative is
# infinite at a point, a finite cotangent times it is inf, and 0 times it (a masked branch) NaN.
_BACKWARD_WHY: dict = {
    prims.sqrt_p: (_UNARY, "its derivative 1/(2·sqrt(x)) is infinite at x = 0 and undefined "
                           "for x < 0"),
    prims.rsqrt_p: (_UNARY, "its derivative -1/(2·x^(3/2)) is infinite at x = 0"),
    prims.cbrt_p: (_UNARY, "its derivative 1/(3·x^(2/3)) is infinite at x = 0"),
    prims.log_p: (_UNARY, "its derivative 1/x is infinite at x = 0 (and log is undefined for "
                          "x < 0)"),
    prims.log1p_p: (_UNARY, "its derivative 1/(1 + x) is infinite at x = -1"),
    prims.div_p: (_BINARY, "its derivatives 1/y and -x/y² are infinite at y = 0"),
    prims.pow_p: (_BINARY, "its derivatives y·x^(y-1) (infinite at x = 0 for y < 1) and "
                           "x^y·log(x) (undefined for x <= 0)"),
    prims.integer_pow_p: (_UNARY, "a negative power x^n has the infinite derivative n·x^(n-1) "
                                  "at x = 0"),
    prims.exp_p: (_UNARY, "exp(x) and its derivative overflow to inf above x ≈ 88.7 in "
                          "float32 (709.8 in float64)"),
    prims.exp2_p: (_UNARY, "2^x and its derivative overflow to inf above x ≈ 128 in float32"),
    prims.expm1_p: (_UNARY, "its derivative exp(x) overflows to inf above x ≈ 88.7 in "
                            "float32"),
    prims.sinh_p: (_UNARY, "its derivative cosh(x) overflows above |x| ≈ 89 in float32"),
    prims.cosh_p: (_UNARY, "its derivative sinh(x) overflows above |x| ≈ 89 in float32"),
    prims.tan_p: (_UNARY, "its derivative 1 + tan²(x) is infinite at x = π/2 + kπ"),
    prims.asin_p: (_UNARY, "its derivative 1/sqrt(1 - x²) is infinite at x = ±1"),
    prims.acos_p: (_UNARY, "its derivative -1/sqrt(1 - x²) is infinite at x = ±1"),
    prims.atanh_p: (_UNARY, "its derivative 1/(1 - x²) is infinite at x = ±1"),
    prims.acosh_p: (_UNARY, "its derivative 1/sqrt(x² - 1) is infinite at x = 1"),
    prims.atan2_p: (_BINARY, "its derivatives y/(x² + y²) and -x/(x² + y²) are 0/0 at "
                             "x = y = 0"),
    prims.erf_inv_p: (_UNARY, "its derivative is infinite at x = ±1"),
    prims.lgamma_p: (_UNARY, "its derivative digamma(x) is infinite at x = 0, -1, -2, ..."),
    prims.digamma_p: (_UNARY, "its derivative polygamma(1, x) is infinite at x = 0, -1, ..."),
}
_FORWARD_WHY: dict = {
    prims.sqrt_p: "sqrt is NaN for x < 0",
    prims.rsqrt_p: "rsqrt is inf at x = 0 and NaN for x < 0",
    prims.log_p: "log is -inf at x = 0 and NaN for x < 0",
    prims.log1p_p: "log1p is -inf at x = -1 and NaN for x < -1",
    prims.div_p: "x/y is ±inf for y = 0 (NaN for 0/0)",
    prims.exp_p: "exp overflows to inf above x ≈ 88.7 in float32 (709.8 in float64)",
    prims.exp2_p: "2^x overflows to inf above x ≈ 128 in float32",
    prims.pow_p: "x^y is NaN for x < 0 with non-integer y, and inf at x = 0 for y < 0",
    prims.integer_pow_p: "x^n overflows for large |x| (or is inf at x = 0 for n < 0)",
}


def _operand_text(names: tuple, values: Sequence[float], types: tuple) -> str:
    parts = []
    for j, name in enumerate(names):
        if j < len(types) and j < len(values) and not np.isnan(values[j]):
            parts.append(f"{name} = {_fmt(values[j])}")
    return ", ".join(parts)


@dataclasses.dataclass
class PassOrigin:
    """One pass's origin, read back on the host."""

    pass_name: str                  # "forward" or "backward"
    entry: Entry
    position: tuple                 # index of the first bad element of the offending value
    steps: tuple                    # step of each enclosing scan, outermost first
    bad_value: float
    cotangent_in: float             # the cotangent that arrived (backward), else NaN
    output_value: float
    operand_values: tuple
    operand: int
    nonfinite_operands: tuple       # operands that already held NaN/inf
    count: int                      # non-finite elements of the offending value
    total: int                      # equations of this pass with a non-finite result

    @property
    def layer(self) -> str:
        return self.entry.scope

    @property
    def location(self) -> str:
        return self.entry.where

    def explanation(self) -> str:
        """Why this equation turned finite values into ``bad_value``, as a clause."""
        e = self.entry
        prim, vals = e.explain_key, self.operand_values
        if e.primitive == "input":
            return f"the input {e.where} already contains {_kind(self.bad_value)}"
        if self.nonfinite_operands:
            ops = ", ".join(f"operand {j} ({e.operands[j]})" for j in self.nonfinite_operands
                            if j < len(e.operands))
            return f"its {ops} already held NaN/inf from the forward pass"
        if self.pass_name == "backward":
            names, why = _BACKWARD_WHY.get(prim, (None, None))
            if why is not None:
                at = _operand_text(names, vals, e.operands)
                text = f"{e.primitive} at {at}: {why}" if at else f"{e.primitive}: {why}"
                if self.cotangent_in == 0 and np.isnan(self.bad_value):
                    text += ("; the cotangent arriving here was 0 (this value is masked out "
                             "further on, e.g. by jnp.where) and 0 · inf = NaN: keep the "
                             "masked inputs away from the bad point too (the 'double where' "
                             "trick)")
                return text
            if np.isinf(self.bad_value):
                return (f"its vector-Jacobian product overflowed: finite values (cotangent "
                        f"{_fmt(self.cotangent_in)}) multiplied past the largest "
                        f"{e.operands[0].split('[')[0] if e.operands else 'float'}")
            return (f"its vector-Jacobian product formed {_kind(self.bad_value)} from finite "
                    f"values (inf - inf or 0 · inf inside the rule; cotangent "
                    f"{_fmt(self.cotangent_in)})")
        names = _BACKWARD_WHY.get(prim, (("x", "y", "z", "w"), None))[0]
        at = _operand_text(names, vals, e.operands)
        why = _FORWARD_WHY.get(prim)
        head = f"{e.primitive} at {at}" if at else e.primitive
        if why is not None:
            return f"{head}: {why}"
        return f"{head} produced {_kind(self.bad_value)} from finite operands (overflow)" \
            if np.isinf(self.bad_value) else f"{head} produced NaN from finite operands"

    def where_text(self) -> str:
        """``file:line in function, layer 'scope', inside step t of the scan at ...``."""
        e = self.entry
        parts = [_frame_text(e.where)]
        if e.scope:
            parts.append(f"layer '{e.scope}'")
        scans = iter(s for s in self.steps if s >= 0)
        inside = []
        for prim, where in e.within:
            where = _frame_text(where)
            if prim == "scan":
                step = next(scans, None)
                inside.append(f"step {step} of the scan at {where}" if step is not None
                              else f"the scan at {where}")
            elif prim in ("jit", "pjit"):
                inside.append(f"the jit at {where}")
            elif prim.startswith("remat") or prim == "checkpoint":
                inside.append(f"the jax.checkpoint at {where}")
            elif prim == "cond":
                inside.append(f"a branch of the cond at {where}")
            else:
                inside.append(f"the {prim} at {where}")
        if inside:
            parts.append("inside " + ", inside ".join(reversed(inside)))
        return ", ".join(parts)

    def __str__(self) -> str:
        e = self.entry
        at = f" at index {list(self.position)}" if self.position else ""
        if e.primitive == "input":
            n = "1 element" if self.count == 1 else f"{self.count} elements"
            return f"{e.where} already holds {_kind(self.bad_value)} ({n}; the first{at})"
        subject = ("the gradient became " if self.pass_name == "backward"
                   else "the forward pass first produced ")
        return (f"{subject}{_kind(self.bad_value)} at `{e.primitive}` ({self.where_text()}): "
                f"{self.explanation()}")

    @property
    def propagated(self) -> bool:
        """Whether the bad value only carried a NaN/inf that an operand already held."""
        return bool(self.nonfinite_operands) or self.entry.primitive == "input"


def _frame_text(where: str) -> str:
    """``file:line in function`` from ``compat.user_frame``'s ``file:line (function)``."""
    if where.endswith(")") and " (" in where:
        loc, _, fn = where[:-1].rpartition(" (")
        return f"{loc} in {fn}"
    return where


def _read(origin: Origin, table: list[Entry], pass_name: str) -> PassOrigin | None:
    if not bool(np.asarray(origin.found)):
        return None
    entry = table[int(origin.index)]
    vals = np.asarray(origin.values, np.float64)
    operand = int(origin.operand)
    if pass_name == "backward":
        shape = _shape_of(entry.operands[operand]) if operand < len(entry.operands) else ()
    else:
        shape = _shape_of(entry.outputs[operand]) if operand < len(entry.outputs) else ()
    pos = int(origin.position)
    position = tuple(int(i) for i in np.unravel_index(pos, shape)) if shape else ()
    bits = int(origin.nonfinite_operands)
    return PassOrigin(pass_name, entry, position,
                      tuple(int(s) for s in np.asarray(origin.steps)), float(vals[_BAD]),
                      float(vals[_CT_OUT]), float(vals[_OUT]),
                      tuple(float(v) for v in vals[_OPS:]), operand,
                      tuple(j for j in range(N_OPERANDS) if bits >> j & 1),
                      int(origin.count), int(origin.total))


def _shape_of(type_str: str) -> tuple:
    """``(3, 4)`` from ``"f32[3,4]"``."""
    inside = type_str.partition("[")[2].partition("]")[0]
    return tuple(int(d) for d in inside.split(",") if d.strip().isdigit())


@jax.tree_util.register_pytree_node_class
class NonfiniteReport:
    """Where the value or gradient of a function first became non-finite.

    ``backward`` / ``forward``: a ``PassOrigin`` (or ``None`` where that pass stayed finite);
    ``grad_nonfinite`` / ``grad_size``: non-finite gradient entries, all gradient entries;
    ``value_finite``. ``str(report)`` is a sentence. Returned by ``nonfinite_origin`` (``None``
    instead when all is finite, except under ``jax.jit``, where ``bool(report)`` says whether
    anything is non-finite). A pytree of arrays, so it can leave a jitted function.
    """

    def __init__(self, fwd: Origin, bwd: Origin, value_finite, grad_nonfinite, grad_size: int,
                 fwd_table: tuple, bwd_table: tuple):
        self._fwd, self._bwd = fwd, bwd
        self.value_finite, self.grad_nonfinite = value_finite, grad_nonfinite
        self.grad_size = grad_size
        self._fwd_table, self._bwd_table = fwd_table, bwd_table

    def tree_flatten(self):
        return ((self._fwd, self._bwd, self.value_finite, self.grad_nonfinite),
                (self.grad_size, self._fwd_table, self._bwd_table))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def forward(self) -> PassOrigin | None:
        return _read(self._fwd, list(self._fwd_table), "forward")

    @property
    def backward(self) -> PassOrigin | None:
        return _read(self._bwd, list(self._bwd_table), "backward")

    def __bool__(self) -> bool:
        return bool(np.asarray(self._fwd.found) | np.asarray(self._bwd.found)
                    | ~np.asarray(self.value_finite) | (np.asarray(self.grad_nonfinite) > 0))

    def to_dict(self) -> dict:
        """Plain values for metrics.jsonl."""
        out: dict = {"message": str(self), "grad_nonfinite": int(self.grad_nonfinite),
                     "grad_size": self.grad_size, "value_finite": bool(self.value_finite)}
        for name, o in (("backward", self.backward), ("forward", self.forward)):
            if o is not None:
                out[name] = {"primitive": o.entry.primitive, "location": o.location,
                             "layer": o.layer, "position": list(o.position),
                             "scan_steps": [s for s in o.steps if s >= 0],
                             "bad_value": _fmt(o.bad_value), "explanation": o.explanation(),
                             "nonfinite_elements": o.count, "equations_nonfinite": o.total}
        return out

    def __str__(self) -> str:
        if not self:
            return "The value and the gradient are finite."
        b, f = self.backward, self.forward
        sentences = [str(o) for o in (b, f) if o is not None]
        if b is not None and f is not None and b.propagated:
            sentences.reverse()  # the forward origin is the cause: say it first
        if f is None:
            sentences.append("the forward pass was finite")
        elif b is None:
            sentences.append("no backward equation turned finite cotangents non-finite")
        n = int(self.grad_nonfinite)
        tail = f"{n:,} of {self.grad_size:,} gradient entries are non-finite"
        if b is not None:
            tail += (f"; {b.total} backward equation{'s' if b.total != 1 else ''} produced "
                     "non-finite cotangents")
        sentences.append(tail)
        return " ".join(x[0].upper() + x[1:] + "." for x in sentences)

    def __repr__(self) -> str:
        return f"NonfiniteReport({self})"


def nonfinite_origin(fun: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """``nonfinite_origin(fun)(*args) -> (value, grad, report)``.

    ``value`` and ``grad`` are what ``bpkit.value_and_grad(fun, argnums)`` returns; ``report``
    is ``None`` when both are finite, else a ``NonfiniteReport`` naming where the gradient
    (backward origin) and the value (forward origin) first became non-finite. Called on
    concrete arrays it compiles the checks with ``jax.jit`` itself; called inside a traced
    function (``jax.jit(nonfinite_origin(loss))``) it returns the report as arrays, always
    (test it with ``bool(report)``).

        >>> value, grad, report = bpkit.debug.nonfinite_origin(loss)(params, batch)
        >>> if report: print(report)
        The gradient became NaN at `sqrt` (layer 'mlp/norm', model.py:41 (norm)): sqrt at x = 0:
        its derivative 1/(2·sqrt(x)) is infinite at x = 0 ...
    """
    argnums_tuple = api._check_argnums(argnums)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        if max(argnums_tuple) >= len(args):
            raise TypeError(f"nonfinite_origin: argnums={argnums} needs at least "
                            f"{max(argnums_tuple) + 1} positional arguments, got {len(args)}.")
        flat_args, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        flat_args = [compat.as_array(x) for x in flat_args]
        traced = core.trace(fun, flat_args, in_tree)
        if traced.out_tree.num_leaves != 1:
            raise TypeError("nonfinite_origin needs a function returning one scalar (like "
                            f"bpkit.grad); this one returned a pytree {traced.out_tree}.")
        names = [f"argument {path[0].idx}{jax.tree_util.keystr(path[1:])}"
                 for path, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
        names += [f"keyword argument {jax.tree_util.keystr(path)}"
                  for path, _ in jax.tree_util.tree_flatten_with_path(kwargs)[0]]
        names += [f"a constant closed over by {getattr(fun, '__name__', 'the function')} "
                  f"({_type_str(c)})" for c in traced.consts]
        spans = api._leaf_spans(args)
        wrt = sorted({i for n in argnums_tuple for i in range(*spans[n])})

        def run(consts, leaves):
            return _run(traced, consts, leaves, wrt, names)

        if any(compat.is_tracer(x) for x in list(flat_args) + list(traced.consts)):
            value, cts, report = run(traced.consts, flat_args)
        else:
            key = (id(traced.jaxpr), tuple(wrt))
            if key not in _compiled or _compiled[key][0] is not traced.jaxpr:
                _compiled[key] = (traced.jaxpr, jax.jit(run))
            value, cts, report = _compiled[key][1](traced.consts, flat_args)
            if not report:
                report = None
        grads = []
        for n in argnums_tuple:
            lo, hi = spans[n]
            leaves = [api._instantiate(cts[j], flat_args[j]) for j in range(lo, hi)]
            grads.append(jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(args[n]), leaves))
        grad = grads[0] if isinstance(argnums, int) else tuple(grads)
        return jax.tree_util.tree_unflatten(traced.out_tree, [value]), grad, report

    return wrapped


# (jaxpr id, differentiated leaves) -> (jaxpr, jitted run): eager calls compile once.
_compiled: dict = {}


def _run(traced, consts, leaves, wrt: list[int], names: list[str]):
    """Forward and backward pass of ``traced`` under a ``NonfiniteObserver``."""
    obs = NonfiniteObserver()
    active = [i in set(wrt) and _is_float(x) for i, x in enumerate(leaves)]
    with core.observing(obs):
        obs.inputs(names, list(leaves) + list(consts))
        outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, consts, leaves, active)
        value = outs[0]
        aval = compat.typeof(value)
        if aval.shape != () or not jnp.issubdtype(aval.dtype, jnp.floating):
            raise TypeError("nonfinite_origin needs a function returning a real scalar; this "
                            f"one returned {aval.str_short()}.")
        cts = backward([jnp.ones((), aval.dtype)] + [None] * (len(outs) - 1))
    cts = [cts[i] if i in set(wrt) else None for i in range(len(leaves))]
    grad_leaves = [c for c in cts if c is not None]
    grad_nonfinite = sum((jnp.sum(~jnp.isfinite(c)).astype(jnp.int32) for c in grad_leaves),
                         jnp.asarray(0, jnp.int32))
    grad_size = int(sum(np.size(leaves[i]) for i in wrt if _is_float(leaves[i])))
    report = NonfiniteReport(obs.fwd.state, obs.bwd.state, jnp.isfinite(value), grad_nonfinite,
                             grad_size, tuple(obs.fwd.table), tuple(obs.bwd.table))
    return value, cts, report


__all__ = ["nonfinite_origin", "NonfiniteReport", "PassOrigin", "NonfiniteObserver"]

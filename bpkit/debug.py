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
from jax import lax

from bpkit.engine import api, compat, core

MAX_SCANS = 4        # nesting depth of scans whose step is reported
N_OPERANDS = 4       # operands whose value at the bad position is reported
NONE = np.iinfo(np.int32).max  # the code of a finite value
_NAN, _POS_INF, _NEG_INF = 0, 1, 2
# Layout of the details vector (second run, for one equation): the cotangent that arrived
# (backward), the primal output at the bad position, then the operands there.
_CT_OUT, _OUT, _OPS = 0, 1, 2


def _value_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _code(x):
    """``4·position + kind`` of the first NaN/inf of ``x`` (kind: NaN, +inf, -inf), or
    ``NONE`` when ``x`` is finite: one fused elementwise pass and one reduction."""
    n = int(np.size(x))
    if n == 0 or 4 * n >= NONE:
        return jnp.asarray(NONE, jnp.int32)
    flat = jnp.ravel(jnp.real(x) if jnp.iscomplexobj(x) else x)
    kind = jnp.where(jnp.isnan(flat), _NAN, jnp.where(flat > 0, _POS_INF, _NEG_INF))
    if n == 1:
        return jnp.where(jnp.isfinite(flat[0]), NONE, kind[0]).astype(jnp.int32)
    codes = jnp.where(jnp.isfinite(flat), NONE, 4 * lax.iota(jnp.int32, n) + kind)
    return jnp.min(codes)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One observed value of a pass: an equation's output (forward), an equation's input
    cotangent (backward), or a function input. Static: it is the report's table row."""

    primitive: str                  # primitive name, or "input"
    where: str                      # file:line (function), or the input's path
    scope: str                      # jax.named_scope path ("" when none)
    within: tuple                   # enclosing equations, outermost first: (primitive, where)
    operands: tuple                 # operand types, e.g. ("f32[32,10]", "f32[]")
    outputs: tuple                  # output types
    operand: int                    # which output (forward) / input cotangent (backward)
    slots: tuple = ()               # the pass's scan-step slots of its enclosing scans
    counts: bool = True             # counted in ``total`` (not a call around counted ones)
    key: tuple = ()                 # identity of (enclosing equations, equation, operand)
    explain_key: Any = None         # the primitive object (explanation table)

    @property
    def type(self) -> str:
        types = self.operands if self.primitive == "input" else (
            self.outputs if self.key and self.key[-1][0] == "forward" else self.operands)
        return types[self.operand] if 0 <= self.operand < len(types) else ""


class Summary(NamedTuple):
    """A pass's result (arrays; a pytree): ``index`` of the first non-finite entry (-1: none)
    and its ``code``, the ``steps`` of its enclosing scans (outermost first, -1 unused),
    ``total`` equations with a non-finite result, and for the detail target (second run)
    ``details`` (see ``_CT_OUT``...; NaN where unknown) and ``nonfinite_operands`` (bits)."""

    index: Any
    code: Any
    steps: Any
    total: Any
    details: Any
    nonfinite_operands: Any


def _type_str(x) -> str:
    aval = compat.typeof(x)
    return aval.str_short() if hasattr(aval, "str_short") else str(aval)


def _is_float(x) -> bool:
    return x is not None and compat.is_inexact(compat.typeof(x))


def _value_at(x, position, shape):
    """``x``'s element at flat ``position`` of an array of ``shape`` (its one element if it is
    a scalar; NaN if it has another shape), in the report's float dtype."""
    dtype = None if x is None else compat.typeof(x).dtype
    if dtype is None or not any(jnp.issubdtype(dtype, k)
                                for k in (jnp.inexact, jnp.integer, jnp.bool_)):
        return jnp.asarray(jnp.nan, _value_dtype())
    x = jnp.real(x) if jnp.iscomplexobj(x) else jnp.asarray(x)
    if tuple(np.shape(x)) == tuple(shape) and np.size(x) > 0:
        v = lax.dynamic_index_in_dim(jnp.ravel(x), position, keepdims=False)
    elif np.size(x) == 1:
        v = jnp.ravel(x)[0]
    else:
        return jnp.asarray(jnp.nan, _value_dtype())
    return v.astype(_value_dtype())


def _no_details():
    return (jnp.full((_OPS + N_OPERANDS,), jnp.nan, _value_dtype()), jnp.asarray(-1, jnp.int32))


class _PassLog:
    """One pass's entries (static) and their codes (arrays), scan-step slots, and the details
    of the detail target when it is seen here."""

    def __init__(self):
        self.entries: list[Entry] = []
        self.pieces: list = []          # codes: scalars, or blocks from nested traces
        self.slots: list = []           # scan steps (int32 scalars)
        self.totals: list = []          # totals of nested traces
        self.details = None             # (values, bits) once the detail target is seen

    def add(self, entry: Entry, code) -> None:
        self.entries.append(entry)
        self.pieces.append(code)

    def summary(self) -> Summary:
        n = len(self.entries)
        details, bits = self.details if self.details is not None else _no_details()
        if n == 0:
            return Summary(jnp.asarray(-1, jnp.int32), jnp.asarray(NONE, jnp.int32),
                           jnp.full((MAX_SCANS,), -1, jnp.int32),
                           sum(self.totals, jnp.asarray(0, jnp.int32)), details, bits)
        codes = jnp.concatenate([jnp.reshape(c, (-1,)) for c in self.pieces])
        bad = codes < NONE
        first = jnp.argmax(bad).astype(jnp.int32)
        index = jnp.where(jnp.any(bad), first, -1)
        counted = np.array([e.counts for e in self.entries])
        total = jnp.sum(bad & counted).astype(jnp.int32) + sum(
            self.totals, jnp.asarray(0, jnp.int32))
        # The slots of each entry's enclosing scans, padded with -1 (a static table).
        table = np.full((n, MAX_SCANS), -1, np.int32)
        for i, e in enumerate(self.entries):
            table[i, :len(e.slots[:MAX_SCANS])] = e.slots[:MAX_SCANS]
        slot_values = jnp.stack(self.slots + [jnp.asarray(-1, jnp.int32)])  # [-1] -> -1
        steps = slot_values[jnp.asarray(table)[first]]
        return Summary(index, codes[first], steps, total, details, bits)

    def merge(self, entries: Sequence[Entry], summary: Summary, new_slots: list,
              matched: bool, offset=0) -> None:
        """Append a nested trace's ``entries``, whose first non-finite one is
        ``summary.index - offset`` ... within them; ``new_slots`` are the step slots that
        the entries' ``slots`` (renumbered by the caller) refer to."""
        n = len(entries)
        self.entries.extend(entries)
        self.slots.extend(new_slots)
        hit = jnp.arange(n, dtype=jnp.int32) == summary.index + offset
        self.pieces.append(jnp.where(hit & (summary.index >= 0), summary.code, NONE))
        self.totals.append(summary.total)
        if matched:
            self.details = (summary.details, summary.nonfinite_operands)


# Equations whose rule evaluates nested equations that are observed themselves: not counted
# in ``total`` (their nested equations are).
_CONTAINERS = {p for p in (getattr(prims, "pjit_p", None), getattr(prims, "jit_p", None),
                           prims.closed_call_p, prims.remat_p, prims.scan_p, prims.cond_p,
                           prims.custom_jvp_call_p) if p is not None}


class NonfiniteObserver:
    """The equation observer behind ``nonfinite_origin`` (see ``bpkit.engine.core``).

    Per observed value it adds one fused reduction (``_code``). ``targets`` (phase -> entry
    key) asks for the operand values of one entry per pass instead: the second run, made
    eagerly once the origins are known, which computes nothing for the other entries."""

    def __init__(self, targets: dict | None = None, backward_only: bool = False,
                 key_prefix: tuple = ()):
        self.logs = {"forward": _PassLog(), "backward": _PassLog()}
        self.frames: list[tuple[Any, bool]] = []  # (eqn, inside its backward rule)
        self.targets = targets or {}
        self.backward_only = backward_only
        self.key_prefix = key_prefix
        self.matched = {"forward": False, "backward": False}

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

    def _frame_key(self) -> tuple:
        return self.key_prefix + tuple(id(f) for f, _ in self.frames)

    def _add(self, phase, eqn, invals, outs, operand: int, value, ct_out=None):
        key = self._frame_key() + ((phase, id(eqn), operand),)
        within = tuple((f.primitive.name, compat.user_frame(f)) for f, _ in self.frames)
        scopes = [compat.name_stack(f) for f, _ in self.frames] + [compat.name_stack(eqn)]
        entry = Entry(eqn.primitive.name, compat.user_frame(eqn),
                      "/".join(s for s in scopes if s), within,
                      tuple(_type_str(x) for x in invals), tuple(_type_str(x) for x in outs),
                      operand, counts=eqn.primitive not in _CONTAINERS, key=key,
                      explain_key=eqn.primitive)
        target = self.targets.get(phase) == key
        code = _code(value) if target or not self.targets else jnp.asarray(NONE, jnp.int32)
        log = self.logs[phase]
        log.add(entry, code)
        if target:
            self.matched[phase] = True
            log.details = _details(code, value, invals, ct_out,
                                   outs[0] if phase == "backward" and outs else None)

    def forward(self, eqn, invals, outs):
        if self._recomputing():
            return
        for o, x in enumerate(outs):
            if _is_float(x):
                self._add("forward", eqn, invals, outs, o, x)

    def backward(self, eqn, invals, outs, cts_out, cts_in):
        # The first equation (in backward order) with a non-finite input cotangent is where
        # the NaN/inf was born: its output cotangents are sums of the finite cotangents pulled
        # back before it (an overflow in that sum aside).
        ct_out = next((c for c in cts_out if _is_float(c)), None)
        for i, ct in enumerate(cts_in):
            if _is_float(ct):
                self._add("backward", eqn, invals, outs, i, ct, ct_out)

    def fork(self, backward_only: bool):
        return NonfiniteObserver(self.targets, backward_only or self._recomputing(),
                                 self._frame_key())

    def state(self, phase: str) -> list:
        return list(self.logs[phase].summary())

    def _prefixed(self, entries: Sequence[Entry], slot_base: int, scan: bool) -> list[Entry]:
        """``entries`` of a nested trace seen from here: enclosing equations and scope
        prefixed; slots renumbered to ``slot_base + ...`` (after this scan's own slot)."""
        within = tuple((f.primitive.name, compat.user_frame(f)) for f, _ in self.frames)
        scope = "/".join(s for s in (compat.name_stack(f) for f, _ in self.frames) if s)
        first = (slot_base,) if scan else ()
        shift = slot_base + (1 if scan else 0)
        return [dataclasses.replace(
            e, within=within + e.within, scope="/".join(x for x in (scope, e.scope) if x),
            slots=(first + tuple(shift + j for j in range(len(e.slots))))[:MAX_SCANS])
            for e in entries]

    def join_scan(self, child: "NonfiniteObserver", phase: str, stacked: list, *,
                  reverse: bool):
        """Fold a scan body's per-step summaries (``stacked``: leading axis = step) in: the
        first step, in the order the loop ran, with a non-finite value gives the origin."""
        if phase == "forward" and self._recomputing():
            return
        per_step = Summary(*stacked)
        length = per_step.index.shape[0]
        order = jnp.arange(length)[::-1] if reverse else jnp.arange(length)
        t = order[jnp.argmax(per_step.index[order] >= 0)].astype(jnp.int32)
        pick = Summary(*(x[t] for x in per_step))._replace(
            total=jnp.sum(per_step.total).astype(jnp.int32))
        log = self.logs[phase]
        base = len(log.slots)
        new_slots = [t] + [pick.steps[j] for j in range(MAX_SCANS - 1)]
        log.merge(self._prefixed(child.logs[phase].entries, base, scan=True), pick, new_slots,
                  child.matched[phase])
        self.matched[phase] |= child.matched[phase]

    def join_switch(self, children: Sequence["NonfiniteObserver"], phase: str, state: list,
                    index):
        """Fold in the summary of the branch ``index`` took (``state``)."""
        summary = Summary(*state)
        sizes = [len(c.logs[phase].entries) for c in children]
        offsets = jnp.asarray(np.cumsum([0] + sizes[:-1]), jnp.int32)
        branch = jnp.clip(index, 0, len(children) - 1)
        log = self.logs[phase]
        base = len(log.slots)
        entries = [e for c in children for e in c.logs[phase].entries]
        matched = any(c.matched[phase] for c in children)
        log.merge(self._prefixed(entries, base, scan=False), summary,
                  [summary.steps[j] for j in range(MAX_SCANS)], matched,
                  offset=offsets[branch])
        self.matched[phase] |= matched

    # -- inputs -----------------------------------------------------------------------------
    def inputs(self, names: Sequence[str], values: Sequence[Any]):
        """Check the function's inputs (and closed-over constants) before its first equation."""
        log = self.logs["forward"]
        for i, (name, x) in enumerate(zip(names, values)):
            if _is_float(x):
                t = _type_str(x)
                log.add(Entry("input", name, "", (), (t,), (t,), 0, key=(("input", i),)),
                        _code(x))


def _details(code, value, invals, ct_out, out):
    """``(values, bits)`` for the detail target: the cotangent that arrived, the primal
    output and the operands at the bad position; bit j set when operand j holds a NaN/inf."""
    position = jnp.clip(code // 4, 0, max(int(np.size(value)) - 1, 0))
    shape = np.shape(value)
    ops = list(invals[:N_OPERANDS]) + [None] * (N_OPERANDS - len(invals[:N_OPERANDS]))
    values = jnp.stack([_value_at(ct_out, position, shape), _value_at(out, position, shape)]
                       + [_value_at(x, position, shape) for x in ops])
    bits = jnp.asarray(0, jnp.int32)
    for j, x in enumerate(invals[:N_OPERANDS]):
        if _is_float(x):
            bits = bits | jnp.where(jnp.all(jnp.isfinite(x)), 0, 1 << j).astype(jnp.int32)
    return values, bits


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
    prims.atan2_p: (("y", "x"), "its derivatives x/(x² + y²) and -y/(x² + y²) are 0/0 at "
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


def _operand_text(names: tuple, values: Sequence[float]) -> str:
    parts = []
    for j, name in enumerate(names):
        if j < len(values) and not np.isnan(values[j]):
            parts.append(f"{name} = {_fmt(values[j])}")
    return ", ".join(parts)


@dataclasses.dataclass
class PassOrigin:
    """One pass's origin, read back on the host. The operand values (``cotangent_in``,
    ``output_value``, ``operand_values``, ``nonfinite_operands``) are known when the report
    was made eagerly (a second, targeted run); under ``jax.jit`` they are NaN / ``None``."""

    pass_name: str                  # "forward" or "backward"
    entry: Entry
    position: tuple                 # index of the first bad element of the offending value
    steps: tuple                    # step of each enclosing scan, outermost first
    kind: str                       # "NaN", "inf" or "-inf"
    total: int                      # equations of this pass with a non-finite result
    cotangent_in: float = float("nan")   # the cotangent that arrived (backward)
    output_value: float = float("nan")
    operand_values: tuple = ()
    nonfinite_operands: tuple | None = None  # operands that already held NaN/inf

    @property
    def layer(self) -> str:
        return self.entry.scope

    @property
    def location(self) -> str:
        return self.entry.where

    @property
    def operand(self) -> int:
        return self.entry.operand

    def explanation(self) -> str:
        """Why this equation turned finite values into a NaN/inf, as a clause."""
        e = self.entry
        prim, vals = e.explain_key, self.operand_values
        if e.primitive == "input":
            return f"the input {e.where} already contains {self.kind}"
        if self.nonfinite_operands:
            ops = ", ".join(f"operand {j} ({e.operands[j]})" for j in self.nonfinite_operands
                            if j < len(e.operands))
            return f"its {ops} already held NaN/inf from the forward pass"
        if self.pass_name == "backward":
            names, why = _BACKWARD_WHY.get(prim, (None, None))
            if why is not None:
                at = _operand_text(names, vals)
                text = f"{e.primitive} at {at}: {why}" if at else f"{e.primitive}: {why}"
                if self.cotangent_in == 0 and self.kind == "NaN":
                    text += ("; the cotangent arriving here was 0, and 0 · inf = NaN: a "
                             "zero derivative further on (a jnp.where masking this value, say) "
                             "does not cancel an infinite one here. Keep the input away from "
                             "the bad point (sqrt(x + eps), or the 'double where' trick)")
                return text
            arrived = ("" if np.isnan(self.cotangent_in)
                       else f" (the cotangent arriving was {_fmt(self.cotangent_in)})")
            if self.nonfinite_operands is None:
                return (f"its vector-Jacobian product gave {self.kind}{arrived}; if the "
                        "forward pass was not finite, the forward origin below is the cause")
            if self.kind != "NaN":
                return (f"its vector-Jacobian product overflowed{arrived}: finite values "
                        "multiplied past the largest float")
            return (f"its vector-Jacobian product formed NaN from finite values (inf - inf or "
                    f"0 · inf inside the rule){arrived}")
        names = _BACKWARD_WHY.get(prim, (("x", "y", "z", "w"), None))[0]
        at = _operand_text(names, vals)
        why = _FORWARD_WHY.get(prim)
        head = f"{e.primitive} at {at}" if at else e.primitive
        if why is not None:
            return f"{head}: {why}"
        if self.nonfinite_operands is None:
            return f"{head} produced {self.kind}"
        if self.kind != "NaN":
            return (f"{head} produced {self.kind} from finite operands: the result overflows "
                    f"{_dtype_of(e.outputs[e.operand] if e.operand < len(e.outputs) else '')}"
                    " (values grew too large, e.g. a too-high learning rate)")
        return f"{head} produced NaN from finite operands (inf - inf or 0 · inf inside it)"

    def where_text(self) -> str:
        """``file:line in function, layer 'scope', inside step t of the scan at ...``."""
        e = self.entry
        parts = [_frame_text(e.where)]
        if e.scope:
            parts.append(f"layer '{e.scope}'")
        scans = iter(self.steps)
        inside = []
        for prim, where in e.within:
            where = _frame_text(where)
            if prim == "scan":
                step = next(scans, -1)
                inside.append(f"step {step} of the scan at {where}" if step >= 0
                              else f"the scan at {where}")
            elif prim in ("jit", "pjit"):
                inside.append(f"the jit at {where}")
            elif prim.startswith("remat") or prim == "checkpoint":
                inside.append(f"the jax.checkpoint at {where}")
            elif prim == "cond":
                next(scans, None)  # a cond has a slot too (its branch's scans follow)
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
            return f"{e.where} already holds {self.kind} (the first{at})"
        subject = ("the gradient became " if self.pass_name == "backward"
                   else "the forward pass first produced ")
        return (f"{subject}{self.kind} at `{e.primitive}` ({self.where_text()}): "
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


def _read(summary: Summary, table: Sequence[Entry], pass_name: str) -> PassOrigin | None:
    index = int(np.asarray(summary.index))
    if index < 0:
        return None
    entry = table[index]
    code = int(np.asarray(summary.code))
    shape = _shape_of(entry.type)
    position = tuple(int(i) for i in np.unravel_index(code // 4, shape)) if shape else ()
    kind = {_NAN: "NaN", _POS_INF: "inf", _NEG_INF: "-inf"}[code % 4]
    depth = sum(p in ("scan", "cond") for p, _ in entry.within)
    steps = tuple(int(t) for t in np.asarray(summary.steps)[:depth])
    details = np.asarray(summary.details, np.float64)
    bits = int(np.asarray(summary.nonfinite_operands))
    return PassOrigin(pass_name, entry, position, steps, kind, int(np.asarray(summary.total)),
                      float(details[_CT_OUT]), float(details[_OUT]),
                      tuple(float(v) for v in details[_OPS:]),
                      None if bits < 0 else tuple(j for j in range(N_OPERANDS) if bits >> j & 1))


def _dtype_of(type_str: str) -> str:
    """``"float32 (max 3.4e38)"`` from ``"f32[3,4]"`` or ``"float32[3,4]"``."""
    name = type_str.partition("[")[0]
    name = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64"}.get(
        name, name)
    top = {"float16": "6.5e4", "bfloat16": "3.4e38", "float32": "3.4e38", "float64": "1.8e308"}
    return f"{name} (max {top[name]})" if name in top else (name or "float")


def _shape_of(type_str: str) -> tuple:
    """``(3, 4)`` from ``"f32[3,4]"``."""
    inside = type_str.partition("[")[2].partition("]")[0]
    return tuple(int(d) for d in inside.split(",") if d.strip().isdigit())


@jax.tree_util.register_pytree_node_class
class NonfiniteReport:
    """Where the value or gradient of a function first became non-finite.

    ``backward`` / ``forward``: a ``PassOrigin`` (or ``None`` where that pass stayed finite);
    ``grad_nonfinite`` / ``grad_size``: non-finite gradient entries, all gradient entries;
    ``value_finite``. ``str(report)`` is a sentence; ``to_dict()`` gives plain values. A
    pytree of arrays, so it can leave a jitted function; ``bool(report)`` says whether
    anything is non-finite.
    """

    def __init__(self, fwd: Summary, bwd: Summary, value_finite, grad_nonfinite,
                 grad_size: int, fwd_table: tuple, bwd_table: tuple):
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
        return _read(self._fwd, self._fwd_table, "forward")

    @property
    def backward(self) -> PassOrigin | None:
        return _read(self._bwd, self._bwd_table, "backward")

    def with_details(self, detailed: "NonfiniteReport") -> "NonfiniteReport":
        """This report with the operand values of ``detailed`` (the targeted run)."""
        def take(mine: Summary, theirs: Summary) -> Summary:
            return mine._replace(details=theirs.details,
                                 nonfinite_operands=theirs.nonfinite_operands)
        return NonfiniteReport(take(self._fwd, detailed._fwd), take(self._bwd, detailed._bwd),
                               self.value_finite, self.grad_nonfinite, self.grad_size,
                               self._fwd_table, self._bwd_table)

    def targets(self) -> dict:
        """The entry keys of the two origins (what the second, detailed run looks at)."""
        out = {}
        for phase, o in (("forward", self.forward), ("backward", self.backward)):
            if o is not None:
                out[phase] = o.entry.key
        return out

    def __bool__(self) -> bool:
        return bool(int(np.asarray(self._fwd.index)) >= 0 or int(np.asarray(self._bwd.index)) >= 0
                    or not bool(np.asarray(self.value_finite))
                    or int(np.asarray(self.grad_nonfinite)) > 0)

    def to_dict(self) -> dict:
        """Plain values (for metrics.jsonl)."""
        out: dict = {"message": str(self), "grad_nonfinite": int(self.grad_nonfinite),
                     "grad_size": self.grad_size, "value_finite": bool(self.value_finite)}
        for name, o in (("backward", self.backward), ("forward", self.forward)):
            if o is not None:
                out[name] = {"primitive": o.entry.primitive, "location": o.location,
                             "layer": o.layer, "position": list(o.position),
                             "scan_steps": list(o.steps), "kind": o.kind,
                             "explanation": o.explanation(), "equations_nonfinite": o.total}
        return out

    def __str__(self) -> str:
        if not self:
            return "The value and the gradient are finite."
        b, f = self.backward, self.forward
        sentences = [str(o) for o in (b, f) if o is not None]
        if b is not None and f is not None and (b.propagated or f.entry.primitive == "input"):
            sentences.reverse()  # the forward origin is the cause: say it first
        if f is None:
            sentences.append("the forward pass was finite")
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
    (backward origin) and the value (forward origin) first became non-finite.

    Called on concrete arrays, it compiles the checks itself and, when something is found,
    runs once more with the origin known to read the operand values there (``sqrt at x =
    0``). Called inside a traced function (``jax.jit(nonfinite_origin(loss))``) it returns
    the report as arrays, always (test it with ``bool(report)``), without operand values.

        >>> value, grad, report = bpkit.debug.nonfinite_origin(loss)(params, batch)
        >>> if report: print(report)
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
        wrt = tuple(sorted({i for n in argnums_tuple for i in range(*spans[n])}))

        if any(compat.is_tracer(x) for x in list(flat_args) + list(traced.consts)):
            value, cts, report = _run(traced, traced.consts, flat_args, wrt, names, {})
        else:
            value, cts, report = _compiled_run(traced, wrt, names)(traced.consts, flat_args)
            if not report:
                report = None
            else:  # again, reading the operand values at the origins (only there)
                targets = report.targets()
                _, _, detailed = jax.jit(lambda consts, leaves: _run(
                    traced, consts, leaves, wrt, names, targets))(traced.consts, flat_args)
                report = report.with_details(detailed)
        grad = api.gradients_of(cts, flat_args, spans, args, argnums_tuple, argnums)
        return jax.tree_util.tree_unflatten(traced.out_tree, [value]), grad, report

    return wrapped


# (jaxpr id, differentiated leaves) -> (jaxpr, jitted run): eager calls compile once.
_compiled: dict = {}


def _compiled_run(traced, wrt: tuple, names: list):
    key = (id(traced.jaxpr), wrt)
    hit = _compiled.get(key)
    if hit is None or hit[0] is not traced.jaxpr:
        if len(_compiled) > 64:
            _compiled.clear()
        run = jax.jit(lambda consts, leaves: _run(traced, consts, leaves, wrt, names, {}))
        _compiled[key] = hit = (traced.jaxpr, run)
    return hit[1]


def _run(traced, consts, leaves, wrt: tuple, names: list[str], targets: dict):
    """Forward and backward pass of ``traced`` under a ``NonfiniteObserver``."""
    obs = NonfiniteObserver(targets)
    active = [i in wrt and _is_float(x) for i, x in enumerate(leaves)]
    with core.observing(obs):
        obs.inputs(names, list(leaves) + list(consts))
        outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, consts, leaves, active)
        value = outs[0]
        aval = compat.typeof(value)
        if aval.shape != () or not jnp.issubdtype(aval.dtype, jnp.floating):
            raise TypeError("nonfinite_origin needs a function returning a real scalar; this "
                            f"one returned {aval.str_short()}.")
        cts = backward([jnp.ones((), aval.dtype)] + [None] * (len(outs) - 1))
    cts = [cts[i] if i in wrt else None for i in range(len(leaves))]
    grad_nonfinite = sum((jnp.sum(~jnp.isfinite(c)).astype(jnp.int32) for c in cts
                          if c is not None), jnp.asarray(0, jnp.int32))
    grad_size = int(sum(np.size(leaves[i]) for i in wrt if _is_float(leaves[i])))
    fwd, bwd = obs.logs["forward"], obs.logs["backward"]
    report = NonfiniteReport(fwd.summary(), bwd.summary(), jnp.isfinite(value), grad_nonfinite,
                             grad_size, tuple(fwd.entries), tuple(bwd.entries))
    return value, cts, report


__all__ = ["nonfinite_origin", "NonfiniteReport", "PassOrigin", "NonfiniteObserver"]

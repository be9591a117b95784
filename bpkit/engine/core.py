"""bpkit's reverse-mode engine: trace -> forward pass -> reverse walk over the equations.

The whole algorithm (compare JAX's autodidax, ``eval_jaxpr_transposed``):

1. **Trace** the function to a jaxpr with ``jax.make_jaxpr`` (cached per function, input
   types and non-differentiated arguments, so eager calls with the same shapes do not trace
   again). Only the differentiated arguments become jaxpr inputs; the others reach the
   function as the caller passed them, as with ``jax.grad`` (see ``bpkit.engine.api``).
2. **Forward pass**: evaluate the equations in order, keeping every value in ``primal_env``.
   An input is *active* when it is differentiated and floating point; an equation with an
   active input and a floating-point output is *on the tape*: its rule is looked up, and its
   outputs become active. Everything else (integer index arithmetic, random bits, masks,
   comparisons) is evaluated and forgotten: an equation without a floating-point output can
   carry no cotangent, so it never needs a rule.
3. **Backward pass**: seed the output cotangents, walk the tape in reverse, pull each
   equation's output cotangents back through its hand-written rule, and accumulate the input
   cotangents in ``ct_env`` by addition. A cotangent that is known to be zero is simply absent
   from ``ct_env`` (a *symbolic zero*): it is never materialised and its equation is skipped.

Rules are written with ordinary ``jax.lax``/``jax.numpy`` operations, so the backward pass is
itself a JAX program: it runs eagerly, under ``jax.jit``/``vmap``, and can be differentiated
again by bpkit (second derivatives) or by ``jax.grad``.

An *equation observer* (``observing``) sees every equation of both passes with its values and
cotangents: ``bpkit.debug`` (where a NaN is born), ``bpkit.per_example`` (per-example gradient
norms) and ``bpkit.diagnostics.health`` are built on it. Without one, the engine only checks
for it at trace time: the traced program is the same.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.extend.core.primitives as _prims

from bpkit.engine import compat, registry

# When true, every rule's cotangents are checked against the shapes and dtypes of the primals
# they belong to (the test suite turns this on; it costs nothing under jit but a Python check).
CHECK_RULE_OUTPUTS = False


# The equation observer (bpkit.debug, bpkit.per_example): ``None`` in normal use, so that the
# engine's only extra work is this check, at trace time (the traced program is unchanged).
# An observer has three methods:
#   forward(eqn, invals, outs)                    after each equation of a forward pass;
#   backward(eqn, invals, outs, cts_out, cts_in)  after each equation's pullback (cts_in: one
#                                                 per input, None where no cotangent flows);
#   nested(eqn, backward) -> context manager      around the rule of ``eqn`` (its forward rule,
#                                                 or with backward=True its pullback), inside
#                                                 which nested jaxprs (jit, remat...) are seen.
# An observer sees only equations evaluated in the trace it was installed in: inside a nested
# trace (a loop body that a rule traces) it is not current, so no tracer can leak out. The scan
# and cond rules follow it in explicitly (``fork``, ``join_scan``/``join_switch``, see
# rules/control.py) when it can (``fork`` returns None where it cannot).
_observer = None   # (observer, the trace it watches) or None
# Calls whose body an observer sees even off the differentiated path (evaluated by their
# forward rule instead of being bound whole).
_CALLS = {p for p in (getattr(_prims, "jit_p", None), getattr(_prims, "pjit_p", None),
                      _prims.closed_call_p, _prims.remat_p) if p is not None}


def current_observer():
    """The active equation observer, or ``None`` (none, or JAX is tracing a nested function
    now, not the computation the observer watches; see ``observing``)."""
    if _observer is None or _observer[1] is not compat.current_trace():
        return None
    return _observer[0]


@contextlib.contextmanager
def observing(observer):
    """Make ``observer`` see every equation the engine evaluates inside this context, in the
    current trace (``None``: nothing is observed)."""
    global _observer
    saved = _observer
    _observer = None if observer is None else (observer, compat.current_trace())
    try:
        yield observer
    finally:
        _observer = saved


class RuleContractError(AssertionError):
    """A rule returned a cotangent whose shape or dtype differs from its primal's."""


@dataclass(frozen=True)
class Traced:
    """A function traced once for given input types."""

    jaxpr: Any  # the open jaxpr
    consts: list
    out_tree: Any  # pytree structure of the function's output


# fun -> {key: (Traced, arrays the key names by identity)}, least recently used first; weak
# keys so that traces die with their functions. A function keeps at most MAX_TRACES traces
# (statics such as a Python float that changes every call would otherwise pile up), and at
# most MAX_IDENTITY_TRACES of those that keep arrays alive (enough for a loop over the same
# data, without holding on to every batch of a loop over new ones).
_trace_cache: "weakref.WeakKeyDictionary[Callable, OrderedDict]" = weakref.WeakKeyDictionary()
MAX_TRACES = 64
MAX_IDENTITY_TRACES = 2


def trace(fun: Callable, flat_args: Sequence[Any], in_tree, *, call: Callable | None = None,
          static_key: Any = (), keepalive: Sequence[Any] = ()) -> Traced:
    """Trace ``call(*args, **kwargs)`` to a jaxpr, with caching (``call`` defaults to ``fun``).

    ``flat_args`` are the leaves of the pytree ``(args, kwargs)`` whose structure is ``in_tree``;
    they become the jaxpr's inputs. Everything else ``call`` uses reaches the function as it
    is (the API passes the non-differentiated arguments this way, see ``bpkit.engine.api``).
    Traces are cached per ``fun`` under ``(in_tree, input types, static_key)``;
    ``static_key=None`` means the trace must not be reused. ``keepalive`` holds the arrays
    that ``static_key`` names by identity, so that their ids cannot be reused while cached.
    """
    key = (in_tree, tuple(_type_key(x) for x in flat_args), static_key,
           compat.trace_context())
    entries = None
    if static_key is not None:
        try:
            entries = _trace_cache.setdefault(fun, OrderedDict())
        except TypeError:  # not weak-referenceable (e.g. some builtins): no caching
            pass
    if entries is not None and key in entries:
        entries.move_to_end(key)
        return entries[key][0]
    call = fun if call is None else call

    def flat_fun(*leaves):
        args, kwargs = jax.tree_util.tree_unflatten(in_tree, leaves)
        return call(*args, **kwargs)

    jaxpr, consts, out_shape = compat.make_jaxpr(flat_fun, *flat_args)
    traced = Traced(jaxpr, consts, jax.tree_util.tree_structure(out_shape))
    # A trace that closed over tracers of an enclosing transformation must not outlive it.
    if entries is not None and not any(compat.is_tracer(c) for c in consts):
        entries[key] = (traced, tuple(keepalive))
        holding = [k for k, (_, alive) in entries.items() if alive]
        for k in holding[:-MAX_IDENTITY_TRACES]:
            del entries[k]
        while len(entries) > MAX_TRACES:
            entries.popitem(last=False)
    return traced


def _type_key(x):
    aval = compat.typeof(x)
    return (aval.shape, aval.dtype, getattr(aval, "weak_type", False),
            compat.varying_axes(aval))


def vjp_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[Any], active_in: Sequence[bool],
              known: dict | None = None):
    """Run the forward pass of an open ``jaxpr``; return ``(outs, backward, active_out)``.

    ``active_in[i]`` says whether input ``i`` is differentiated. ``backward(cts_out)`` takes one
    cotangent per output (``None`` = zero) and returns one per input (``None`` = zero).
    ``active_out[j]`` says whether output ``j`` depends on an active input at all.
    ``known`` maps equations (of VJP-rule or non-differentiable primitives) to outputs
    already computed: they are used instead of evaluating the equation again, and its rule
    sees them as ``out`` (how a checkpoint policy's saved values enter the recomputation).
    """
    primal_env: dict = {}
    active: set = set()

    def read(v):
        return v.val if isinstance(v, compat.Literal) else primal_env[v]

    for v, c in zip(jaxpr.constvars, consts):
        primal_env[v] = c
    for v, x, a in zip(jaxpr.invars, args, active_in):
        primal_env[v] = x
        if a and compat.is_inexact(v.aval):
            active.add(v)

    obs = current_observer()
    # (eqn, pullback, record) for each equation on the differentiated path, in order; the
    # record (inputs, outputs) is kept only for an observer.
    tape = []
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        active_mask = [isinstance(v, compat.Var) and v in active for v in eqn.invars]
        outs = None if known is None else known.get(eqn)
        if (not any(active_mask) or eqn.primitive in registry.nondiff_primitives
                or not any(compat.is_inexact(v.aval) for v in eqn.outvars)):
            if obs is not None and eqn.primitive in _CALLS:  # let the observer see inside
                with obs.nested(eqn, backward=False):
                    outs, _ = _forward_with_rule(eqn, invals, active_mask, outs)
            else:
                outs = compat.eval_eqn(eqn, invals) if outs is None else outs
        else:
            with (obs.nested(eqn, backward=False) if obs is not None
                  else contextlib.nullcontext()):
                outs, pullback = _forward_with_rule(eqn, invals, active_mask, outs)
            tape.append((eqn, pullback, None if obs is None else (invals, outs)))
            active.update(v for v in eqn.outvars
                          if not isinstance(v, compat.DropVar) and compat.is_inexact(v.aval))
        if obs is not None:
            obs.forward(eqn, invals, outs)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, compat.DropVar):
                primal_env[v] = x

    outs = [read(v) for v in jaxpr.outvars]
    active_out = [isinstance(v, compat.Var) and v in active for v in jaxpr.outvars]

    def backward(cts_out: Sequence[Any], observe: Callable | None = None) -> list:
        """Pull ``cts_out`` back to the inputs; ``observe(var, ct)``, if given, sees the final
        cotangent of every variable on the tape (the hook behind backward-signal diagnostics)."""
        ct_env: dict = {}
        obs = current_observer()
        for v, ct, a in zip(jaxpr.outvars, cts_out, active_out):
            if a and ct is not None:
                _accumulate(ct_env, v, ct)
        for eqn, pullback, record in reversed(tape):
            cts = [ct_env.pop(v, None) if isinstance(v, compat.Var) else None
                   for v in eqn.outvars]
            if all(ct is None for ct in cts):
                continue  # symbolic zero: nothing flows back through this equation
            if observe is not None:
                for v, ct in zip(eqn.outvars, cts):
                    if ct is not None:
                        observe(v, ct)
            with compat.source_context(eqn), (obs.nested(eqn, backward=True) if obs is not None
                                              else contextlib.nullcontext()):
                try:
                    cts_in = pullback(cts if eqn.primitive.multiple_results else cts[0])
                except registry.UnsupportedPrimitiveError as e:
                    e.locate(eqn)  # a primitive inside this call, loop or checkpoint
                    raise
            if CHECK_RULE_OUTPUTS:
                _check_rule_outputs(eqn, cts_in)
            if obs is not None and record is not None:
                obs.backward(eqn, record[0], record[1], cts,
                             [ct if isinstance(v, compat.Var) and v in active else None
                              for v, ct in zip(eqn.invars, cts_in)])
            for v, ct in zip(eqn.invars, cts_in):
                if ct is not None and isinstance(v, compat.Var) and v in active:
                    _accumulate(ct_env, v, ct)
        return [ct_env.get(v) if v in active else None for v in jaxpr.invars]

    return outs, backward, active_out


def _forward_with_rule(eqn, invals, active_mask, outs=None):
    """Evaluate ``eqn`` (unless its ``outs`` are given) and return ``(outs, pullback)`` from
    its registered rule."""
    prim = eqn.primitive
    fwd_bwd = registry.fwd_bwd_rules.get(prim)
    if fwd_bwd is not None:
        with compat.source_context(eqn):
            try:
                outs, pullback = fwd_bwd(invals, active_mask, **eqn.params)
            except registry.UnsupportedPrimitiveError as e:
                e.locate(eqn)  # a primitive inside this call, loop or checkpoint
                raise
        return list(outs), pullback
    rule = registry.vjp_rules.get(prim)
    if rule is None:
        raise registry.unsupported(eqn)
    outs = compat.eval_eqn(eqn, invals) if outs is None else outs
    out = outs if prim.multiple_results else outs[0]
    params = eqn.params
    return outs, lambda ct: rule(ct, *invals, out=out, **params)


def live_eqns(eqns, wanted) -> list:
    """The equations of ``eqns`` that the ``wanted`` variables depend on (and those with
    effects), in program order: dead-code elimination over a list of equations."""
    live = {v for v in wanted if isinstance(v, compat.Var)}
    keep = []
    for eqn in reversed(eqns):
        if eqn.effects or any(v in live for v in eqn.outvars):
            keep.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, compat.Var))
    return keep[::-1]


def _accumulate(ct_env: dict, v, ct) -> None:
    ct_env[v] = ct if v not in ct_env else ct_env[v] + ct


def _check_rule_outputs(eqn, cts_in) -> None:
    problems = []
    if len(cts_in) != len(eqn.invars):
        problems.append(f"returned {len(cts_in)} cotangents for {len(eqn.invars)} inputs")
    for i, (v, ct) in enumerate(zip(eqn.invars, cts_in)):
        if ct is None or not compat.is_inexact(v.aval):
            continue
        aval = compat.typeof(ct)
        if aval.shape != v.aval.shape or aval.dtype != v.aval.dtype:
            problems.append(f"input {i}: primal {v.aval.str_short()}, cotangent {aval.str_short()}")
    if problems:
        raise RuleContractError(
            f"The VJP rule of '{eqn.primitive.name}' (params {dict(eqn.params)}) broke the rule "
            "contract: " + "; ".join(problems))

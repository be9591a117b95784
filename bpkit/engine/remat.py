"""Automatic rematerialisation (``remat="auto"``): which forward values the backward keeps.

Under ``jax.jit`` a forward value lives in memory from the moment it is computed until the
backward pass last reads it; those *saved values* are most of a training step's memory. Many of
them are cheap to recompute: the backward of ``gelu(a)`` reads ``a`` and ``gelu(a)``, and
``gelu(a)`` costs a few flops per element, which XLA fuses into the backward kernel that reads
it. This module picks, for one differentiated function, the cheapest set of values to save,
the way Lightning Thunder and PyTorch's AOTAutograd do (a minimum cut of the joint graph):

1. **Joint program.** Trace ``(args, cts) -> (outs, input cotangents)`` once with bpkit's own
   engine (``core.vjp_jaxpr``; no JAX differentiation). An equation is *backward* if it depends
   on an output cotangent ``cts``; every other equation is *forward*, including the parts of
   the rules that only read primal values (``1 - tanh(x)**2``): the plan may compute those in
   either pass. The backward reads some forward values: the *required* set.
2. **Minimum cut.** A flow network over the forward values: each value ``v`` is an edge
   ``v.in -> v.out`` whose capacity is its size in bytes (saving ``v`` costs that much); an
   equation that may be recomputed links each input's ``v.out`` to each output's ``w.in``
   (infinite capacity); an equation that may not (``dot_general``, convolutions, reductions,
   loops, random bits, anything with effects or a sub-program) feeds its outputs straight from
   the source: they must be saved if the backward needs them. The function's inputs and
   forward outputs are alive anyway (capacity 0). Every required value is joined to the sink.
   A minimum ``source``/``sink`` cut (Edmonds-Karp max flow, then the residual graph's reach) is
   a set of values from which every required value can be recomputed by cheap equations alone,
   with the fewest bytes: those are saved, the rest of the required values are recomputed.
3. **Run.** The forward pass evaluates only what its outputs and the saved values need. The
   backward pass evaluates the backward equations in order; a forward value that is not saved
   is recomputed from the saved values just before its first reader, behind an
   ``optimization_barrier`` shared with that reader's cotangent, so XLA can neither merge the
   recomputation with the forward pass nor move it earlier (as ``jax.checkpoint`` does).

``remat_budget_bytes`` asks for a plan whose saved values fit: if the cut with the cheap
equations above saves more, reductions, gathers and cumulative ops may be recomputed too, then
matrix products and convolutions; the first plan that fits is used (none fits: the smallest,
with a warning). A budget trades time for memory; without one nothing expensive is recomputed.

Gradients are the same values as without the plan (the same equations run; only where they
run changes). An equation observer (``bpkit.debug``, ``per_example``, diagnostics) sees the
plain engine: with one installed, ``remat="auto"`` is ignored.
"""
from __future__ import annotations

import collections
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import jax
from jax import lax

from bpkit.engine import compat, core

# Cheap to recompute: elementwise arithmetic and data movement (XLA fuses both into readers).
_ELEMENTWISE = """neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin
cos tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs add sub mul div rem pow
integer_pow max min atan2 nextafter erf erfc erf_inv lgamma digamma square reciprocal
select_n clamp convert_element_type real imag conj complex not and or xor eq ne lt le gt ge
shift_left shift_right_logical shift_right_arithmetic population_count stop_gradient
copy reduce_precision""".split()
_STRUCTURAL = """broadcast_in_dim reshape squeeze expand_dims transpose rev slice pad concatenate
iota""".split()
# Recomputed only under a tight budget: each costs a pass over its input (tier 1) ...
_PASSES = """reduce_sum reduce_max reduce_min reduce_prod argmax argmin cumsum cumprod cummax
cummin cumlogsumexp gather dynamic_slice dynamic_update_slice""".split()
# ... or a matrix product (tier 2).
_FUSIBLE_READERS = "reduce_sum reduce_max reduce_min reduce_prod".split()  # XLA fuses producers in
_PRODUCTS = "dot_general conv_general_dilated".split()


def _primitives(names) -> frozenset:
    found = (getattr(lax, f"{n}_p", None) or getattr(jax.extend.core.primitives, f"{n}_p", None)
             for n in names)
    return frozenset(p for p in found if p is not None)


TIERS = (_primitives(_ELEMENTWISE + _STRUCTURAL),)
TIERS += (TIERS[0] | _primitives(_PASSES),)
TIERS += (TIERS[1] | _primitives(_PRODUCTS),)
# Arithmetic without transcendental functions: what a loop body's backward step recomputes
# (an exp or tanh per element per step costs more on a CPU than stacking its result).
_TRANSCENDENTAL = """exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh
asinh acosh atanh sqrt rsqrt cbrt pow erf erfc erf_inv lgamma digamma atan2 nextafter""".split()
ARITHMETIC = TIERS[0] - _primitives(_TRANSCENDENTAL)
# Backward readers whose inputs XLA fuses (a recomputed input need not be materialised).
FUSIBLE = TIERS[0] | _primitives(_FUSIBLE_READERS)
# Layout copies that a backward product may read instead of the value itself.
_COPIES = frozenset({lax.transpose_p, lax.optimization_barrier_p})


@dataclass
class Plan:
    """A partition of one joint program: what the forward pass saves for the backward."""

    jaxpr: Any            # the joint program (args..., cts...) -> (outs..., cotangents...)
    consts: list
    num_args: int         # how many of its inputs are the function's inputs
    ct_outputs: tuple     # the outputs whose cotangents are its other inputs
    num_outs: int         # how many of its outputs are the function's outputs
    grad_slots: list      # input i's cotangent: its index among the joint's cotangents, or None
    active_out: list      # which outputs depend on a differentiated input
    forward_eqns: list    # the forward equations, in program order
    backward_eqns: list
    saved: list           # forward variables the forward pass hands to the backward pass
    tier: int             # which recomputable set the plan uses (0: cheap only)
    saved_bytes: int      # bytes of ``saved`` (the function's inputs and outputs not counted)
    required_bytes: int   # bytes the backward reads: what saving without a plan keeps
    producer: dict = field(default_factory=dict)  # forward variable -> its equation
    order: dict = field(default_factory=dict)     # forward equation -> its position

    def summary(self) -> str:
        return (f"remat plan: saves {len(self.saved)} values, {self.saved_bytes / 2**20:.2f} MiB, "
                f"of the {self.required_bytes / 2**20:.2f} MiB the backward reads "
                f"(recomputable set {self.tier})")


def vjp_jaxpr(jaxpr, consts, args, active_in, budget_bytes: int | None = None,
              ct_outputs: Sequence[int] | None = None):
    """``core.vjp_jaxpr`` under an automatic save-vs-recompute plan (same contract), for
    cotangents of the outputs ``ct_outputs`` (default all; the others' cotangents must be
    ``None``)."""
    ct_outputs = tuple(range(len(jaxpr.outvars)) if ct_outputs is None else ct_outputs)
    plan = plan_for(jaxpr, consts, args, active_in, budget_bytes, ct_outputs)
    env = dict(zip(plan.jaxpr.constvars, plan.consts))
    env.update(zip(plan.jaxpr.invars, args))
    fun_outs = plan.jaxpr.outvars[:plan.num_outs]
    for eqn in core.live_eqns(plan.forward_eqns, [*fun_outs, *plan.saved]):
        env.update(zip(eqn.outvars, compat.eval_eqn(eqn, [_read(env, v) for v in eqn.invars])))
    outs = [_read(env, v) for v in fun_outs]
    kept = {v: env[v] for v in plan.jaxpr.invars[:plan.num_args] + plan.jaxpr.constvars}
    kept.update((v, env[v]) for v in [*plan.saved, *fun_outs] if isinstance(v, compat.Var))

    def backward(cts_out: Sequence[Any], observe=None) -> list:
        if observe is not None:
            raise ValueError("remat='auto' does not support backward observers; use remat=None.")
        env = dict(kept)
        for v, i in zip(plan.jaxpr.invars[plan.num_args:], plan.ct_outputs):
            ct, o = cts_out[i], outs[i]
            env[v] = ct if ct is not None else lax.full(np.shape(o), 0, compat.typeof(o).dtype)
        for eqn in plan.backward_eqns:
            _recompute(plan, env, eqn)
            env.update(zip(eqn.outvars, compat.eval_eqn(eqn, [_read(env, v) for v in eqn.invars])))
        grads = plan.jaxpr.outvars[plan.num_outs:]
        for v in grads:  # a cotangent that is a forward value (it does not depend on cts)
            if isinstance(v, compat.Var) and v not in env:
                _recompute(plan, env, None, [v])
        return [None if slot is None else _read(env, grads[slot]) for slot in plan.grad_slots]

    return outs, backward, plan.active_out


def _read(env, v):
    return v.val if isinstance(v, compat.Literal) else env[v]


def _recompute(plan: Plan, env: dict, reader, wanted=None) -> None:
    """Recompute the forward values ``reader`` (a backward equation) reads that ``env`` lacks,
    from the values ``env`` holds, which pass through one barrier with ``reader``'s inputs."""
    wanted = [v for v in (reader.invars if wanted is None else wanted)
              if isinstance(v, compat.Var) and v not in env]
    if not wanted:
        return
    eqns, frontier, seen = recomputation(wanted, env, plan.producer)
    ties = [v for v in (reader.invars if reader is not None else []) if isinstance(v, compat.Var)
            and v in env and v not in frontier]
    held = lax.optimization_barrier(([env[v] for v in frontier], [env[v] for v in ties]))
    local = collections.ChainMap(dict(zip(frontier, held[0])), env)  # reads fall through to env
    env.update(zip(ties, held[1]))
    for eqn in sorted(eqns, key=plan.order.__getitem__):
        local.update(zip(eqn.outvars, compat.eval_eqn(eqn, [_read(local, u) for u in eqn.invars])))
    env.update((v, local[v]) for v in seen if v not in env)


def recomputation(wanted, held, producer) -> tuple[set, list, set]:
    """``(equations, frontier, visited)``: the equations (by ``producer``) between the values
    in ``held`` and the ``wanted`` ones, the held values they read, and every value visited.
    A plan guarantees that each equation on the way may be recomputed."""
    eqns, frontier, seen, stack = set(), [], set(), list(wanted)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in held:
            frontier.append(v)
            continue
        eqn = producer[v]
        if eqn not in eqns:
            eqns.add(eqn)
            stack.extend(u for u in eqn.invars if isinstance(u, compat.Var))
    return eqns, frontier, seen


# --- planning ------------------------------------------------------------------------------
_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plan_for(jaxpr, consts, args, active_in, budget_bytes: int | None = None,
             ct_outputs: tuple | None = None) -> Plan:
    """The plan for differentiating ``jaxpr`` with cotangents for ``ct_outputs`` (default:
    all outputs); cached per jaxpr, input types, outputs and budget."""
    ct_outputs = tuple(range(len(jaxpr.outvars)) if ct_outputs is None else ct_outputs)
    key = (tuple(compat.typeof(a).str_short() for a in args), tuple(active_in), budget_bytes,
           ct_outputs)
    cached = _plans.setdefault(jaxpr, {}) if not any(compat.is_tracer(c) for c in consts) else {}
    if key not in cached:
        cached[key] = _make_plan(jaxpr, consts, args, active_in, budget_bytes, ct_outputs)
    return cached[key]


def _make_plan(jaxpr, consts, args, active_in, budget_bytes, ct_outputs) -> Plan:
    info = {}

    def joint(args, cts):
        outs, backward, active_out = core.vjp_jaxpr(jaxpr, consts, args, active_in)
        full = [None] * len(outs)
        for i, ct in zip(ct_outputs, cts):
            full[i] = ct
        grads = backward(full)
        info["active_out"] = active_out
        info["slots"] = np.cumsum([g is not None for g in grads]) - 1
        info["slots"] = [int(s) if g is not None else None for s, g in zip(info["slots"], grads)]
        return outs, [g for g in grads if g is not None]

    struct = lambda x: jax.ShapeDtypeStruct(compat.typeof(x).shape, compat.typeof(x).dtype)
    cts = [jax.ShapeDtypeStruct(jaxpr.outvars[i].aval.shape, jaxpr.outvars[i].aval.dtype)
           for i in ct_outputs]
    closed, joint_consts, _ = compat.make_jaxpr(joint, [struct(a) for a in args], cts)
    num_args, num_outs = len(args), len(jaxpr.outvars)

    backward_vars = set(closed.invars[num_args:])
    forward_eqns, backward_eqns = [], []
    live = set(core.live_eqns(closed.eqns, closed.outvars))  # cotangents nobody reads: out
    for eqn in (e for e in closed.eqns if e in live):
        if any(isinstance(v, compat.Var) and v in backward_vars for v in eqn.invars):
            backward_eqns.append(eqn)
            backward_vars.update(eqn.outvars)
        else:
            forward_eqns.append(eqn)
    producer = {v: e for e in forward_eqns for v in e.outvars}
    required = {v for e in backward_eqns for v in e.invars
                if isinstance(v, compat.Var) and v not in backward_vars}
    required.update(v for v in closed.outvars[num_outs:]
                    if isinstance(v, compat.Var) and v not in backward_vars)
    free = set(closed.invars[:num_args]) | set(closed.constvars)
    free.update(v for v in closed.outvars[:num_outs] if isinstance(v, compat.Var))
    # Forward equations the function's outputs do not need are the backward's own work on
    # primal values (a custom_vjp bwd recomputing q kᵀ): the backward may run them whatever
    # they cost, as the plain engine does, rather than saving their results.
    deferrable = set(forward_eqns) - set(core.live_eqns(forward_eqns, closed.outvars[:num_outs]))
    materialized = {_copied_value(v, producer, deferrable) for e in backward_eqns
                    if e.primitive not in FUSIBLE for v in e.invars
                    if isinstance(v, compat.Var) and v in required}

    plans = []
    for tier, recomputable in enumerate(TIERS):
        saved = min_cut(forward_eqns, producer, required, materialized, free,
                         recomputable, deferrable)
        plans.append((tier, saved, sum(_bytes(v) for v in saved)))
        if budget_bytes is None or plans[-1][2] <= budget_bytes:
            break
    else:
        tier, saved, size = min(plans, key=lambda p: p[2])
        warnings.warn(
            f"remat_budget_bytes={budget_bytes} cannot be met: the smallest plan saves {size} "
            "bytes (recomputing everything but the function's inputs and the values of loops, "
            "random bits and calls). Using it; raise the budget or shrink the batch.",
            stacklevel=4)
        plans.append((tier, saved, size))
    tier, saved, size = plans[-1]
    return Plan(closed, joint_consts, num_args, ct_outputs, num_outs, info["slots"],
                info["active_out"], forward_eqns, backward_eqns, saved, tier, size,
                sum(_bytes(v) for v in required if v not in free), producer,
                {e: i for i, e in enumerate(forward_eqns)})


def _copied_value(v, producer, deferrable):
    """The value that ``v`` copies through the backward's own transposes and optimization
    barriers (``v`` itself if none): a product that reads ``transpose(h)`` (the CPU form of a
    small weight gradient, ``rules/linalg.py``) materialises ``h`` as if it read ``h``."""
    while (eqn := producer.get(v)) is not None and eqn in deferrable and eqn.primitive in _COPIES:
        source = eqn.invars[eqn.outvars.index(v)]
        if not isinstance(source, compat.Var):  # a literal: nothing to recompute
            return v
        v = source
    return v


def _bytes(v) -> int:
    aval = v.aval
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def min_cut(forward_eqns, producer, required, materialized, free, recomputable,
             deferrable=frozenset()) -> list:
    """The forward variables to save: a minimum byte-weighted cut between the values nothing
    can recompute and the values the backward pass reads (see the module docstring), such that
    no recomputation passes through a value in ``materialized``.

    Why the condition: a recomputed value stays in memory from its first reader to its last,
    and one read by a matrix product or a convolution of the backward pass is materialised
    (XLA cannot fuse its recomputation into the reader). A chain of recomputations through
    several such values (a residual stream ``h[l+1] = h[l] + f(W[l] h[l])``, each ``h[l]`` read
    by the product that gives ``W[l]``'s gradient) would rebuild every layer's ``h`` at the last
    layer's backward and hold them all, costing more than saving them. Such an inner value is
    made unrecomputable and the cut taken again, until no chain passes through one that is
    itself recomputed through another. One materialised link whose own inputs are held (a
    slice of a saved ``k`` that both a recomputed ``q kᵀ`` and a backward product read) stays
    recomputable: it is rebuilt next to its readers, where saving it would hold it all along."""
    pinned: set = set()  # values whose producer must not be recomputed
    while True:
        saved = _cut_once(forward_eqns, producer, required, free, recomputable, deferrable,
                          pinned)
        held = free | set(saved)
        chained = {u for v in required - held
                   for u in _materialized_links(v, producer, held, materialized)}
        chained = {u for u in chained if _materialized_links(u, producer, held, materialized)}
        if not chained:
            return saved
        pinned |= chained


def _materialized_links(v, producer, held, materialized) -> set:
    """The first values in ``materialized`` that recomputing ``v`` from ``held`` passes through."""
    found, seen = set(), set()
    stack = [u for u in producer[v].invars if isinstance(u, compat.Var)]
    while stack:
        u = stack.pop()
        if u in seen or u in held:
            continue
        seen.add(u)
        if u in materialized:
            found.add(u)
        else:
            stack.extend(w for w in producer[u].invars if isinstance(w, compat.Var))
    return found


def _cut_once(forward_eqns, producer, required, free, recomputable, deferrable,
              pinned) -> list:
    INF = float("inf")
    cap: dict = collections.defaultdict(dict)

    def edge(a, b, c):
        cap[a][b] = cap[a].get(b, 0) + c
        cap[b].setdefault(a, 0)

    def can_recompute(v):
        eqn = producer.get(v)
        return (v not in free and v not in pinned and eqn is not None
                and (eqn.primitive in recomputable or eqn in deferrable) and not eqn.effects)

    live = set(required)
    for eqn in reversed(forward_eqns):  # only the ancestors of what the backward reads
        if any(v in live for v in eqn.outvars) and can_recompute(eqn.outvars[0]):
            live.update(v for v in eqn.invars if isinstance(v, compat.Var))
    for v in live:
        edge(("in", v), ("out", v), 0 if v in free else _bytes(v))
        if not can_recompute(v):
            edge("source", ("in", v), INF)
        else:
            for u in producer[v].invars:
                if isinstance(u, compat.Var):
                    edge(("out", u), ("in", v), INF)
        if v in required:
            edge(("out", v), "sink", INF)
    reach = _residual_reach(cap, "source", "sink")
    return [v for v in live if ("in", v) in reach and ("out", v) not in reach
            and v not in free]


def _residual_reach(cap: dict, source, sink) -> set:
    """Edmonds-Karp: push flow along shortest augmenting paths until none is left; return the
    nodes still reachable from ``source`` in the residual graph (the source side of a min cut)."""
    while True:
        parent, queue = {source: None}, collections.deque([source])
        while queue and sink not in parent:
            a = queue.popleft()
            for b, c in cap[a].items():
                if c > 0 and b not in parent:
                    parent[b] = a
                    queue.append(b)
        if sink not in parent:
            return set(parent)
        path, b = [], sink
        while parent[b] is not None:
            path.append((parent[b], b))
            b = parent[b]
        push = min(cap[a][b] for a, b in path)
        if push == float("inf"):
            raise AssertionError("remat plan: a required value has no finite cut")
        for a, b in path:
            cap[a][b] -= push
            cap[b][a] += push

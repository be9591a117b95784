"""Rules of call and control-flow primitives: nested jit, remat, custom_jvp/custom_vjp, scan, cond.

These are forward-backward rules (``rule(primals, active, **params) -> (outs, pullback)``),
because what their backward pass needs is produced by their forward pass in a special way:

* **jit / closed_call**: the inner jaxpr is differentiated in place by the same engine (inlined).
* **remat** (``jax.checkpoint``): the forward saves what the ``policy`` names (nothing without
  one); the pullback re-runs the forward of the inner jaxpr with the saved values given (behind
  an optimisation barrier shared with the cotangents, so XLA can neither merge it with the
  first one nor run it before the backward pass gets there).
* **custom_jvp_call**: the user's JVP rule is respected (``jax.nn.relu`` has slope 0 at 0). It is
  linear in the tangents, so its transpose is obtained by running bpkit's own engine on the
  user's JVP jaxpr with respect to the tangent inputs.
* **custom_vjp_call**: the user's ``fwd`` runs in the forward pass and the user's ``bwd`` in the
  backward pass, as in JAX.
* **scan** (backpropagation through time): the body's forward and backward are traced together
  once, then split by dependence on the cotangents: the forward scan runs the cotangent-free half
  and stacks the per-step values the backward half needs (residuals); the backward scan runs the
  other half in the opposite direction, carrying the carry cotangents and summing the cotangents
  of loop-invariant inputs.
* **cond / switch**: the pullback is a ``switch`` over the branches' own pullbacks (each branch
  re-runs its forward inside the backward, so the forward keeps no per-branch residuals).
* ``while`` loops have their own module, ``loops.py`` (checkpointed reverse mode).
* **linear_call** (``jax.custom_derivatives.linear_call``): the user's transpose function gives
  the cotangent of the linear arguments.

An equation observer (``bpkit.engine.core.observing``) follows into scan and cond bodies, which
are traced separately: the rules ``fork`` a child observer for the body and ``join`` what it
found (for scan, one summary per step, carried out of both loops as extra outputs); observers
that cannot follow (``fork`` returns None) see nothing inside.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import Offloadable, Saveable

from bpkit.engine import compat, core, registry
from bpkit.engine.core import vjp_jaxpr
from bpkit.engine.registry import fwd_bwd_rules, register_fwd_bwd
from bpkit.rules.helpers import instantiate_zeros, zeros_like


def _zeros_for(values):
    return [zeros_like(v) for v in values]


def _zero_tangent(x):
    """A zero tangent for ``x`` as JAX builds it: zeros of its dtype, float0 for integers."""
    aval = compat.typeof(x)
    return (jnp.zeros(aval.shape, aval.dtype) if compat.is_inexact(aval)
            else compat.float0_zeros(aval))


# --- jit and calls: differentiate the inner jaxpr in place ------------------------------------
def _call_fwd_bwd(primals, active, **params):
    inner, consts = compat.open_jaxpr(compat.jit_jaxpr(params))
    outs, backward, _ = vjp_jaxpr(inner, consts, primals, active)
    return outs, backward


# program_order (jax.experimental.overlap, JAX >= 0.11): a call that keeps its body's
# equations in program order on the device; the values are the body's, so is the derivative.
_PROGRAM_ORDER = compat.internal_primitive("program_order_p")
for _p in {getattr(prims, "jit_p", None), getattr(prims, "pjit_p", None), prims.closed_call_p,
           _PROGRAM_ORDER}:
    if _p is not None:
        register_fwd_bwd(_p, _call_fwd_bwd)


# --- remat: save what the policy names, recompute the rest in the backward pass ---------------
@register_fwd_bwd(prims.remat_p)
def _remat_fwd_bwd(primals, active, *, jaxpr, prevent_cse, policy=None, **params):
    """``jax.checkpoint(f, policy=...)``: the forward pass keeps the outputs of the equations
    the policy saves (only those the backward pass reads); the pullback re-runs the forward of
    ``f`` with those outputs given, so only the rest is recomputed, then pulls back through it.

    A policy is JAX's predicate ``policy(primitive, *input_avals, **params)`` and is asked, as
    by JAX, about the primitive equations of ``f`` including those inside nested ``jit`` calls;
    calls with their own rules (scan, cond, custom_jvp/custom_vjp, nested checkpoints) are
    recomputed whole. ``Offloadable`` answers (offload policies) save the value on the device
    rather than in host memory. Without a policy nothing is saved.
    """
    inner, consts = compat.open_jaxpr(jaxpr) if hasattr(jaxpr, "consts") else (jaxpr, [])
    saved_eqns = []
    if policy is not None:
        inner, consts = _inline_calls(inner, consts)
        saved_eqns = [e for e in inner.eqns if _policy_saves(policy, e)]

    def replay(xs, saved):
        return vjp_jaxpr(inner, consts, xs, active, known=dict(zip(saved_eqns, saved)))[1]

    def recompute_and_pull_back(xs, saved, cts):
        # One barrier over the inputs, the saved values and the cotangents: XLA can neither
        # merge the recomputation with the forward pass nor schedule it before the backward
        # pass reaches this point (which would keep its values alive as long as saving them).
        if prevent_cse:
            xs, saved, cts = lax.optimization_barrier((xs, saved, cts))
        return replay(xs, saved)(cts)

    if not saved_eqns:
        outs, _, _ = vjp_jaxpr(inner, consts, primals, [False] * len(primals))
        return outs, lambda cts: recompute_and_pull_back(list(primals), [], list(cts))

    env = dict(zip(inner.constvars, consts))
    env.update(zip(inner.invars, primals))
    _eval_eqns(inner.eqns, env)
    outs = [env[v] if isinstance(v, compat.Var) else v.val for v in inner.outvars]
    # Keep only what the recomputation and the backward pass read (as JAX keeps only the
    # residuals its backward pass uses); the others are recomputed if needed at all.
    read = _read_saved(replay, primals, saved_eqns, env, outs)
    saved_eqns = [e for e, r in zip(saved_eqns, read) if r]
    saved = [[env[v] for v in e.outvars] for e in saved_eqns]

    return outs, lambda cts: recompute_and_pull_back(list(primals), saved, list(cts))


def _policy_saves(policy, eqn) -> bool:
    """Whether ``policy`` saves the outputs of ``eqn`` (JAX's convention: ``True`` or
    ``Saveable`` save, ``Offloadable`` saves too (kept on the device), ``False`` or
    ``Recompute`` recompute). Equations with forward-backward rules are never saved whole."""
    if eqn.primitive in fwd_bwd_rules or not eqn.outvars:
        return False
    decision = policy(eqn.primitive, *[v.aval for v in eqn.invars], **eqn.params)
    return (decision is Saveable or isinstance(decision, Offloadable)
            or (isinstance(decision, (bool, np.bool_)) and bool(decision)))


def _read_saved(replay, primals, saved_eqns, env, outs) -> list[bool]:
    """For each saved equation, whether the recomputation or backward pass reads its outputs:
    the pullback is traced once (all output cotangents nonzero) and unused inputs dropped."""
    saved = [[env[v] for v in e.outvars] for e in saved_eqns]
    cts = [jnp.zeros(compat.typeof(o).shape, compat.typeof(o).dtype) for o in outs]
    struct = lambda x: jax.ShapeDtypeStruct(compat.typeof(x).shape, compat.typeof(x).dtype)
    spec = jax.tree_util.tree_map(struct, (list(primals), saved, cts))
    flat_spec, tree = jax.tree_util.tree_flatten(spec)

    def flat_pullback(*leaves):
        xs, res, cts = jax.tree_util.tree_unflatten(tree, leaves)
        return replay(xs, res)(cts)

    backward, _, _ = compat.make_jaxpr(flat_pullback, *flat_spec)
    used = _used_inputs(backward)
    n_x = len(primals)
    flags, i = [], n_x
    for outs_of_eqn in saved:
        flags.append(any(used[i:i + len(outs_of_eqn)]))
        i += len(outs_of_eqn)
    return flags


def _used_inputs(jaxpr) -> list[bool]:
    """Which inputs of ``jaxpr`` its outputs depend on (equations with effects count as used;
    sub-jaxprs are not looked into, so their equations count as reading all their inputs)."""
    live = {v for v in jaxpr.outvars if isinstance(v, compat.Var)}
    live.update(v for e in core.live_eqns(jaxpr.eqns, jaxpr.outvars) for v in e.invars
                if isinstance(v, compat.Var))
    return [v in live for v in jaxpr.invars]


_CALL_PRIMITIVES = {p for p in (getattr(prims, "jit_p", None), getattr(prims, "pjit_p", None),
                                prims.closed_call_p) if p is not None}


@dataclass(frozen=True)
class _FlatJaxpr:
    """An open jaxpr rebuilt by bpkit: the fields ``vjp_jaxpr`` reads."""

    constvars: list
    invars: list
    outvars: list
    eqns: list


def _inline_calls(jaxpr, consts):
    """``(jaxpr, consts)`` with every nested ``jit``/``closed_call`` body spliced in place (fresh
    variables per call site), so that a checkpoint policy sees the equations inside them."""
    if not any(e.primitive in _CALL_PRIMITIVES for e in jaxpr.eqns):
        return jaxpr, consts
    constvars, const_vals, eqns = list(jaxpr.constvars), list(consts), []

    def atom(env, a):
        return env.get(a, a) if isinstance(a, compat.Var) else a

    def splice(body_eqns, env):
        for eqn in body_eqns:
            ins = [atom(env, a) for a in eqn.invars]
            if eqn.primitive in _CALL_PRIMITIVES:
                body, body_consts = compat.open_jaxpr(compat.jit_jaxpr(eqn.params))
                inner_env = dict(zip(body.invars, ins))
                for v, c in zip(body.constvars, body_consts):
                    inner_env[v] = compat.Var(v.aval)
                    constvars.append(inner_env[v])
                    const_vals.append(c)
                splice(body.eqns, inner_env)
                env.update((o, atom(inner_env, r)) for o, r in zip(eqn.outvars, body.outvars))
            else:
                outs = [o if isinstance(o, compat.DropVar) else compat.Var(o.aval)
                        for o in eqn.outvars]
                env.update(zip(eqn.outvars, outs))
                eqns.append(eqn.replace(invars=ins, outvars=outs))

    env: dict = {}
    splice(jaxpr.eqns, env)
    flat = _FlatJaxpr(constvars, list(jaxpr.invars), [atom(env, v) for v in jaxpr.outvars], eqns)
    return flat, const_vals


# --- custom_jvp: transpose the user's JVP rule with bpkit's own engine ------------------------
@register_fwd_bwd(prims.custom_jvp_call_p)
def _custom_jvp_fwd_bwd(primals, active, *, num_consts, **params):
    if any(active[:num_consts]):
        # A custom_jvp function closed over a differentiated value: JAX's rule does not cover
        # that value either, so differentiate the primal function itself.
        inner, consts = compat.open_jaxpr(compat.custom_vjp_call_jaxpr(params))
        outs, backward, _ = vjp_jaxpr(inner, consts, primals, active)
        return outs, backward
    args, args_active = primals[num_consts:], active[num_consts:]
    # Only a rule declared with symbolic_zeros=True may see symbolic-zero tangents; any other
    # rule gets every tangent as an array (zeros, float0 for integers), as JAX gives it.
    zero_mask = ([not a for a in args_active] if params.get("symbolic_zeros")
                 else [False] * len(args))
    jvp_jaxpr, jvp_consts, out_zeros = compat.custom_jvp_jaxpr(params, zero_mask)
    tangent_of = [i for i, z in enumerate(zero_mask) if not z]  # the arg of each tangent input
    tangents = [_zero_tangent(args[i]) for i in tangent_of]
    n_primal = len(args)
    outs, backward, _ = vjp_jaxpr(jvp_jaxpr, jvp_consts, list(args) + tangents,
                                  [False] * n_primal + [args_active[i] for i in tangent_of])
    n_out = len(out_zeros)
    primal_outs = outs[:n_out]

    def pullback(cts):
        tangent_cts = [ct for ct, zero in zip(cts, out_zeros) if not zero]
        cts_in = backward([None] * n_out + tangent_cts)[n_primal:]
        result = [None] * n_primal
        for i, ct in zip(tangent_of, cts_in):
            result[i] = ct if args_active[i] else None
        return [None] * num_consts + result

    return primal_outs, pullback


# --- custom_vjp: run the user's fwd, then the user's bwd --------------------------------------
@register_fwd_bwd(prims.custom_vjp_call_p)
def _custom_vjp_fwd_bwd(primals, active, **params):
    num_consts, fwd, bwd = compat.custom_vjp_parts(params)
    if any(active[:num_consts]):
        raise NotImplementedError(
            "This custom_vjp function closes over a value that is being differentiated; its "
            "bwd rule cannot give that value a cotangent (JAX refuses this too). Pass the "
            "value as an explicit argument of the custom_vjp function instead.")
    residuals, outs = fwd(list(primals), list(active))

    def pullback(cts):
        cts = [instantiate_zeros(ct, o) for ct, o in zip(cts, outs)]
        cts_in = bwd(residuals, cts)
        return [None] * num_consts + [
            ct if a and compat.is_inexact(compat.typeof(x)) else None
            for ct, a, x in zip(cts_in, active[num_consts:], primals[num_consts:])]

    return outs, pullback


# --- scan: backpropagation through time ---------------------------------------------------------
def _active_outputs(jaxpr, active_in: Sequence[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` depend on an active input (floating point only)."""
    active = {v for v, a in zip(jaxpr.invars, active_in) if a and compat.is_inexact(v.aval)}
    for eqn in jaxpr.eqns:
        if any(isinstance(v, compat.Var) and v in active for v in eqn.invars):
            active.update(v for v in eqn.outvars if compat.is_inexact(v.aval))
    return [isinstance(v, compat.Var) and v in active for v in jaxpr.outvars]


def carry_activity(body, consts_active: Sequence[bool], carry_active: Sequence[bool],
                   xs_active: Sequence[bool] = ()) -> list[bool]:
    """Which carries of a loop body ``(consts, carry, xs) -> (carry, ys)`` are differentiated:
    those whose initial value is, or that the body makes depend on a differentiated input
    (iterated to a fixpoint). Shared by scan and while (``loops.py``)."""
    carry_active = list(carry_active)
    while True:
        out_active = _active_outputs(body, [*consts_active, *carry_active, *xs_active])
        new = [a or b for a, b in zip(carry_active, out_active[:len(carry_active)])]
        if new == carry_active:
            return carry_active
        carry_active = new


def _split_by_cotangent(jaxpr, num_primal_in: int):
    """Split the equations of ``jaxpr`` into those that do not depend on its last inputs (the
    cotangents) and those that do; return ``(primal_eqns, tangent_eqns, residuals)`` where
    residuals are the primal-side variables that the tangent side (or the outputs) read."""
    tangent_vars = set(jaxpr.invars[num_primal_in:])
    primal_eqns, tangent_eqns = [], []
    for eqn in jaxpr.eqns:
        if any(isinstance(v, compat.Var) and v in tangent_vars for v in eqn.invars):
            tangent_eqns.append(eqn)
            tangent_vars.update(eqn.outvars)
        else:
            primal_eqns.append(eqn)
    needed = []
    seen = set()
    for v in [v for e in tangent_eqns for v in e.invars] + list(jaxpr.outvars):
        if isinstance(v, compat.Var) and v not in tangent_vars and v not in seen:
            seen.add(v)
            needed.append(v)
    return primal_eqns, tangent_eqns, needed


def _step_residuals(joint, n_in, primal_eqns, tangent_eqns, const_invars, xs_invars, n_out):
    """What the forward scan stacks per step for the backward scan, by the minimum cut of
    ``remat="auto"`` (``bpkit/engine/remat.py``) over one step: ``(stacked, recompute,
    bwd_xs)``. The backward step recomputes the rest of what it reads (``recompute``:
    arithmetic and data movement, and primal work only the backward needs) from the stacked
    values, the loop's constants and its own ``xs`` (``bwd_xs``, which the backward scan reads
    again rather than stacking copies).

    Transcendental functions are not recomputed: rebuilding an LSTM's gates from its
    pre-activations in every backward step made the step 1.15x slower, while stacking them and
    rebuilding only the products (``1 - f``, ...) costs nothing. One LSTM step stacks 7 values
    (``h``, ``c`` in; the four gates and ``tanh(c)`` out) where the plain split stacked 15
    (docs/benchmarks.md)."""
    from bpkit.engine import remat
    tangent_vars = set(joint.invars[n_in:])
    for eqn in tangent_eqns:
        tangent_vars.update(eqn.outvars)

    def primal(v):
        return isinstance(v, compat.Var) and v not in tangent_vars

    required = {v for e in tangent_eqns for v in e.invars if primal(v)}
    required.update(v for v in joint.outvars[n_out:] if primal(v))  # constant cotangents
    materialized = {v for e in tangent_eqns if e.primitive not in remat.FUSIBLE
                    for v in e.invars if primal(v)}
    free = const_invars | set(xs_invars)
    producer = {v: e for e in primal_eqns for v in e.outvars}
    deferrable = set(primal_eqns) - set(core.live_eqns(primal_eqns, joint.outvars[:n_out]))
    saved = remat.min_cut(primal_eqns, producer, required, materialized, free,
                           remat.ARITHMETIC, deferrable)
    held = free | set(saved)
    recompute, frontier, _ = remat.recomputation([v for v in required if v not in held], held,
                                                 producer)
    read = set(frontier) | required
    order = {e: i for i, e in enumerate(primal_eqns)}
    return ([v for v in saved if v not in free], sorted(recompute, key=order.__getitem__),
            [v for v in xs_invars if v in read])


def _eval_eqns(eqns, env: dict) -> None:
    for eqn in eqns:
        invals = [v.val if isinstance(v, compat.Literal) else env[v] for v in eqn.invars]
        for v, x in zip(eqn.outvars, compat.eval_eqn(eqn, invals)):
            if not isinstance(v, compat.DropVar):
                env[v] = x


@register_fwd_bwd(prims.scan_p)
def _scan_fwd_bwd(primals, active, *, reverse, length, jaxpr, unroll, **params):
    num_consts, num_carry = compat.scan_counts(dict(params, jaxpr=jaxpr))
    body, body_consts = compat.open_jaxpr(jaxpr)
    consts, init, xs = (primals[:num_consts], primals[num_consts:num_consts + num_carry],
                        primals[num_consts + num_carry:])
    n_in = len(primals)

    carry_active = carry_activity(body, active[:num_consts],
                                  active[num_consts:num_consts + num_carry],
                                  active[num_consts + num_carry:])
    in_active = list(active[:num_consts]) + carry_active + list(active[num_consts + num_carry:])
    ys_active = _active_outputs(body, in_active)[num_carry:]
    out_active = carry_active + ys_active
    in_avals = [v.aval for v in body.invars]
    out_avals = [v.aval for v in body.outvars]

    # An equation observer (bpkit.debug) follows into the body through a child observer whose
    # per-step state leaves the two scans as extra outputs; any other observer is suspended.
    obs = core.current_observer()
    child = obs.fork(backward_only=False) if obs is not None else None
    n_fwd_state = n_bwd_state = 0

    # Trace forward and backward of one step together, then split them apart.
    def step_fwd_bwd(*args):
        nonlocal n_fwd_state, n_bwd_state
        step_in, cts = args[:n_in], args[n_in:]
        with core.observing(child):
            outs, backward, _ = vjp_jaxpr(body, body_consts, step_in, in_active)
            cts_iter = iter(cts)
            full_cts = [next(cts_iter) if a else None for a in out_active]
            cts_in = backward(full_cts)
        states = (child.state("forward"), child.state("backward")) if child else ([], [])
        n_fwd_state, n_bwd_state = map(len, states)
        cts_in = [instantiate_zeros(c, x) for c, x, a in zip(cts_in, step_in, in_active) if a]
        return outs, cts_in, *states

    ct_avals = [compat.shape_struct(a) for a, act in zip(out_avals, out_active) if act]
    joint, joint_consts, _ = compat.make_jaxpr(step_fwd_bwd, *map(compat.shape_struct, in_avals),
                                               *ct_avals)
    primal_eqns, tangent_eqns, needed = _split_by_cotangent(joint, n_in)
    joint_in = joint.invars[:n_in]
    const_invars = set(joint_in[:num_consts]) | set(joint.constvars)
    n_out = len(out_avals)

    n_ct_in = sum(in_active)
    fwd_state_vars = joint.outvars[n_out + n_ct_in:n_out + n_ct_in + n_fwd_state]
    bwd_state_vars = joint.outvars[n_out + n_ct_in + n_fwd_state:]
    xs_invars = joint_in[num_consts + num_carry:]
    if child is None:  # the fewest bytes per step (an observer sees the plain split)
        stacked_res, recompute_eqns, bwd_xs = _step_residuals(
            joint, n_in, primal_eqns, tangent_eqns, const_invars, xs_invars, n_out)
    else:
        stacked_res = [v for v in needed if v not in const_invars]
        recompute_eqns, bwd_xs = [], []
    bwd_xs_index = [xs_invars.index(v) for v in bwd_xs]

    def read(env, v):
        return env[v] if isinstance(v, compat.Var) else v.val

    fwd_eqns = core.live_eqns(primal_eqns, [*joint.outvars[:n_out], *stacked_res,
                                            *fwd_state_vars])

    def fwd_body(carry, x):
        env = dict(zip(joint.constvars, joint_consts))
        env.update(zip(joint_in, list(consts) + list(carry) + list(x)))
        _eval_eqns(fwd_eqns, env)
        outs = [read(env, v) for v in joint.outvars[:n_out]]
        fwd_state = [read(env, v) for v in fwd_state_vars]
        return outs[:num_carry], (outs[num_carry:], [env[v] for v in stacked_res], fwd_state)

    carry_out, (ys, residuals, fwd_states) = lax.scan(
        fwd_body, list(init), list(xs), length=length, reverse=reverse, unroll=unroll)
    outs = list(carry_out) + list(ys)
    if child is not None:
        obs.join_scan(child, "forward", fwd_states, reverse=reverse)

    act_consts = [i for i in range(num_consts) if in_active[i]]
    act_carry = [i for i in range(num_carry) if in_active[num_consts + i]]
    act_xs = [i for i in range(n_in - num_consts - num_carry)
              if in_active[num_consts + num_carry + i]]

    def pullback(cts):
        cts = [instantiate_zeros(c, o) if a else None for c, o, a in zip(cts, outs, out_active)]
        ct_carry = [cts[i] for i in act_carry]  # carry activity is a fixpoint: in == out
        ct_ys = [cts[num_carry + i] for i in range(len(ys)) if ys_active[i]]
        ct_consts = _zeros_for([consts[i] for i in act_consts])

        def bwd_body(carry, per_step):
            ct_carry, acc = carry
            res, ct_y, x = per_step
            env = dict(zip(joint.constvars, joint_consts))
            env.update(zip(joint_in[:num_consts], consts))
            env.update(zip(stacked_res, res))
            env.update(zip(bwd_xs, x))
            _eval_eqns(recompute_eqns, env)
            env.update(zip(joint.invars[n_in:], list(ct_carry) + list(ct_y)))
            _eval_eqns(tangent_eqns, env)
            ct_in = [read(env, v) for v in joint.outvars[n_out:n_out + n_ct_in]]
            n_c, n_k = len(act_consts), len(act_carry)
            ct_c, new_ct_carry, ct_x = ct_in[:n_c], ct_in[n_c:n_c + n_k], ct_in[n_c + n_k:]
            bwd_state = [read(env, v) for v in bwd_state_vars]
            return (new_ct_carry, [a + c for a, c in zip(acc, ct_c)]), (ct_x, bwd_state)

        (ct_init, ct_consts), (ct_xs, bwd_states) = lax.scan(
            bwd_body, (ct_carry, ct_consts),
            (residuals, ct_ys, [xs[i] for i in bwd_xs_index]), length=length,
            reverse=not reverse, unroll=unroll)
        if child is not None:
            obs.join_scan(child, "backward", bwd_states, reverse=not reverse)
        result = [None] * n_in
        for i, c in zip(act_consts, ct_consts):
            result[i] = c
        for i, c in zip(act_carry, ct_init):
            result[num_consts + i] = c
        for i, c in zip(act_xs, ct_xs):
            result[num_consts + num_carry + i] = c
        return result

    return outs, pullback


# --- cond / switch ------------------------------------------------------------------------------
@register_fwd_bwd(prims.cond_p)
def _cond_fwd_bwd(primals, active, *, branches, **params):
    index, ops = primals[0], list(primals[1:])
    op_active = list(active[1:])
    outs = prims.cond_p.bind(index, *ops, branches=branches, **params)

    def branch_pullback(branch, child):
        inner, consts = compat.open_jaxpr(branch)

        def run(ops, cts):
            with core.observing(child):
                _, backward, _ = vjp_jaxpr(inner, consts, ops, op_active)
                cts_in = backward(cts)
            state = child.state("backward") if child is not None else []
            return [instantiate_zeros(c, x) for c, x, a in zip(cts_in, ops, op_active) if a], state
        return run

    def pullback(cts):
        cts = [instantiate_zeros(c, o) for c, o in zip(cts, outs)]
        # An equation observer follows into the branches as for scan (see _scan_fwd_bwd).
        obs = core.current_observer()
        children = [obs.fork(backward_only=True) if obs is not None else None
                    for _ in branches]
        act_cts, state = lax.switch(index, [branch_pullback(b, c)
                                            for b, c in zip(branches, children)], ops, cts)
        if obs is not None and children[0] is not None:
            obs.join_switch(children, "backward", state, index)
        it = iter(act_cts)
        return [None] + [next(it) if a else None for a in op_active]

    return list(outs), pullback


# --- linear_call: a call with a user-given transpose ----------------------------------------
_linear_call_p = compat.internal_primitive("linear_call_p")


@register_fwd_bwd(_linear_call_p)
def _linear_call_fwd_bwd(primals, active, *, callee, transpose_thunk, num_callee_consts,
                         num_res):
    """``jax.custom_derivatives.linear_call(f, t, residuals, x)``: ``f`` is linear in ``x`` and
    the user's ``t(residuals, ct)`` is its transpose, so ``ct_x = t(residuals, ct)`` (bound as
    another linear_call whose transpose is ``f``, so bpkit can differentiate it again). The
    residuals may not depend on the differentiated inputs (JAX refuses that too)."""
    fixed = num_callee_consts + num_res
    if any(active[:fixed]):
        raise registry.UnsupportedPrimitiveError(
            "bpkit cannot differentiate linear_call with respect to its residual arguments "
            "(jax.grad refuses this too): the function is only declared linear in its last "
            "arguments. Pass differentiated values among the linear arguments instead.")
    params = dict(callee=callee, transpose_thunk=transpose_thunk,
                  num_callee_consts=num_callee_consts, num_res=num_res)
    outs = _linear_call_p.bind(*primals, **params)
    f_consts, residuals = primals[:num_callee_consts], primals[num_callee_consts:fixed]

    def pullback(cts):
        transpose, t_consts = transpose_thunk()
        cts = [instantiate_zeros(c, o) for c, o in zip(cts, outs)]
        cts_in = _linear_call_p.bind(
            *t_consts, *residuals, *cts, callee=transpose,
            transpose_thunk=lambda: (callee, list(f_consts)),
            num_callee_consts=len(t_consts), num_res=num_res)
        return [None] * fixed + list(cts_in)

    return list(outs), pullback

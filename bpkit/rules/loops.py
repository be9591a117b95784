"""Reverse mode through ``while`` (``lax.while_loop``, ``fori_loop`` with traced bounds), with no
bound on the trip count, in memory for ``c`` copies of the loop state.

``jax.grad`` refuses a ``while``: reverse mode needs the states of every iteration, in reverse,
and a loop whose trip count is only known when it ends cannot preallocate them. This rule keeps
``c`` state checkpoints in a fixed buffer instead and recomputes the rest.

**Forward** (one ``lax.while_loop``, ``n`` body evaluations, ``n`` unknown in advance). It runs
the loop, counts the iterations, and writes the state ``x_i`` (the state *entering* iteration
``i``) into the buffer at every multiple of a stride ``s`` (initially 1), using at most
``F = (c - 1) // 2`` slots. When a multiple of ``s`` comes and all ``F`` are taken, the
checkpoints are thinned (every other one is kept) and ``s`` doubles. So after ``n`` iterations
the buffer holds ``x_0, x_s, x_2s, ...`` with ``s <= 2n/F``: ``n`` is never needed in advance.

**Backward** (one ``lax.while_loop`` over ``t = n-1, ..., 0``). The checkpoints form a stack
(positions increasing to the top) of capacity ``S = c - 1`` (slot ``c - 1`` is scratch). To reverse
iteration ``t``, the state ``x_t`` is recomputed from the top checkpoint ``x_p`` (``p <= t``),
storing intermediate checkpoints on the way where Griewank & Walther's binomial rule (``revolve``,
ACM TOMS 26, 2000) puts them for the ``S - top`` slots left; then the cotangent of the carry is
pulled through the body at ``x_t`` by bpkit's own engine (``vjp_jaxpr`` on the body jaxpr),
the body constants' cotangents are summed, and a checkpoint at ``t`` is popped. Within a segment
between two forward checkpoints this is exactly revolve's optimal schedule.

**Cost.** Memory: the buffer of ``c`` states (plus the running state and cotangents), whatever
``n`` is. Body evaluations: ``n`` forward, ``n`` body VJPs (each one body forward + backward),
and ``R(n, c)`` recomputed steps, given exactly by :func:`recomputed_steps`. Every forward segment
has length ``l <= 2n/F`` and is reversed with ``d >= c - F`` slots, so
``R(n, c) <= r * n`` with ``r`` the smallest integer such that ``binom(d + r, r) >= 2n/F``:
``O(n log n)`` when ``c`` grows like ``log n`` and ``O(n^(1 + 2/c))`` for a fixed ``c``.
For ``c = 16``: ``R = 1.1 n`` at ``n = 100``, ``2.5 n`` at ``1000``, ``3.7 n`` at ``10000``.

**Settings.** ``c`` is 16 unless set, around the call or the trace, by
``bpkit.while_checkpoints(c)`` (or a memory budget, ``while_checkpoints(max_bytes=...)``:
``c = max_bytes // bytes per state``), or by ``bpkit.grad(..., while_checkpoints=c)``. Under
``jax.jit`` the setting in force when the function is traced is the one compiled in.

**Semantics.** As ``jax.grad`` of the same loop written as a ``scan`` of the known trip count:
the condition is never differentiated (its constants get no cotangent), integer and boolean
carries flow without cotangents, a carry is differentiated when its initial value or the body
makes it depend on a differentiated input (fixpoint, as in ``scan``), and loop-invariant inputs
(the body's closed-over constants) get the sum of their cotangents over all iterations. A
zero-trip loop is the identity. The backward pass is made of ``lax`` loops and bpkit's rules, so
it runs under ``jit``, nests (a ``while`` in a ``while``, ``scan``, ``cond``) and is itself
differentiable by bpkit (second derivatives).
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Sequence

import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.core import vjp_jaxpr
from bpkit.engine.registry import register_fwd_bwd
from bpkit.rules.control import carry_activity
from bpkit.rules.helpers import instantiate_zeros

DEFAULT_CHECKPOINTS = 16
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class _Setting:
    count: int | None = None
    max_bytes: int | None = None


_setting: contextvars.ContextVar[_Setting] = contextvars.ContextVar(
    "bpkit_while_checkpoints", default=_Setting(count=DEFAULT_CHECKPOINTS))


class while_checkpoints:  # noqa: N801  (used like a function: ``with while_checkpoints(32):``)
    """Set how many loop states a ``while`` loop's gradient keeps (``count``, at least 2), or
    the memory they may take (``max_bytes``: as many states as fit, at least 2).

    More checkpoints mean fewer recomputed iterations (see ``bpkit/rules/loops.py``). The
    setting applies to gradients computed, or traced by ``jax.jit``, inside the block::

        with bpkit.while_checkpoints(32):
            g = jax.jit(bpkit.grad(loss))(params)   # traced here: 32 checkpoints

    ``bpkit.grad(loss, while_checkpoints=32)`` binds the setting to the function instead, which
    also holds when ``jax.jit`` traces it later.
    """

    def __init__(self, count: int | None = None, *, max_bytes: int | None = None):
        if (count is None) == (max_bytes is None):
            raise ValueError("Pass either a number of checkpoints (while_checkpoints(16)) or a "
                             "memory budget in bytes (while_checkpoints(max_bytes=2**20)), not "
                             "both or neither.")
        if count is not None and (not isinstance(count, (int, np.integer))
                                  or isinstance(count, bool) or count < 2):
            raise ValueError(f"while_checkpoints needs at least 2 checkpoints, got {count!r}. "
                             "Pass an integer >= 2 (more checkpoints: less recomputation).")
        if max_bytes is not None and (not isinstance(max_bytes, (int, np.integer))
                                      or max_bytes <= 0):
            raise ValueError("while_checkpoints(max_bytes=...) needs a positive number of "
                             f"bytes, got {max_bytes!r}.")
        self.setting = _Setting(count=None if count is None else int(count),
                                max_bytes=None if max_bytes is None else int(max_bytes))
        self._tokens: list = []  # a stack, so one instance may be entered again while active

    def __enter__(self):
        self._tokens.append(_setting.set(self.setting))
        return self

    def __exit__(self, *exc_info):
        _setting.reset(self._tokens.pop())


def _checkpoint_count(state: Sequence) -> int:
    setting = _setting.get()
    if setting.count is not None:
        return setting.count
    state_bytes = sum(math.prod(np.shape(x)) * np.dtype(compat.typeof(x).dtype).itemsize
                      for x in state)
    return max(2, setting.max_bytes // max(1, state_bytes))


def _forward_slots(c: int) -> int:
    """``F``: how many of the ``c - 1`` stack slots the forward pass may fill."""
    return max(1, (c - 1) // 2)


# --- where to put the next checkpoint -----------------------------------------------------------
def _binomial_advance(p, t, snaps, xp, loop):
    """Griewank & Walther's ``revolve`` choice of the next checkpoint, in ``(p, t]``.

    With a checkpoint at ``p`` and ``snaps`` slots (that one included), reversing the
    ``l = t + 1 - p`` steps ``p, ..., t`` costs fewest recomputations when the next checkpoint
    goes where this returns (``t`` when ``snaps == 1``: no slot to spare). ``xp``/``loop``
    are ``numpy``/a Python loop or ``jax.numpy``/``lax.while_loop``, so the same code gives the
    traced schedule and :func:`recomputed_steps`. ``reps`` is the smallest ``r`` with
    ``binom(snaps + r, r) >= l``; the ``b*`` are neighbouring binomials.
    """
    steps = t + 1 - p

    def muldiv(a, b, c):  # floor(a * b / c) without forming a * b (int32 stays in range)
        c = xp.maximum(c, 1)
        return (a // c) * b + (a % c) * b // c

    def next_binomial(s):  # binom(snaps + r, r) from binom(snaps + r - 1, r - 1), saturating
        r, b = s[0] + 1, s[1]
        return r, xp.where(b > _INT32_MAX // (r + snaps), _INT32_MAX, muldiv(b, r + snaps, r))

    reps, rng = loop(lambda s: (s[1] < steps) & (snaps > 1),  # one slot: no choice to make
                     next_binomial, (xp.int32(0), xp.int32(1)))
    b1 = muldiv(rng, reps, snaps + reps)
    b2 = xp.where(snaps > 1, muldiv(b1, snaps, snaps + reps - 1), 1)
    b3 = xp.where(snaps > 2, muldiv(b2, snaps - 1, snaps + reps - 2), xp.where(snaps == 2, 1, 0))
    b4 = muldiv(b2, reps - 1, snaps)
    b5 = xp.where(snaps > 3, muldiv(b3, snaps - 2, reps), xp.where(snaps == 3, 1, 0))
    m = xp.where(steps <= b1 + b3, p + b4,
                 xp.where(steps >= rng - b5, p + b1, t + 1 - b2 - b3))
    m = xp.where(snaps <= 1, t, m)
    m = xp.where(rng == _INT32_MAX, p + steps // 2, m)  # segments beyond ~10^7: bisect
    return xp.minimum(xp.maximum(m, p + 1), t)


def _python_loop(cond, body, state):
    while cond(state):
        state = body(state)
    return state


def recomputed_steps(n: int, c: int) -> int:
    """``R(n, c)``: the body evaluations the backward pass spends recomputing states (beyond
    the ``n`` of the forward and the ``n`` body VJPs), for ``n`` iterations and ``c`` checkpoints.

    A plain-Python run of the same schedule the traced rule follows."""
    F = _forward_slots(c)
    stride, k = 1, 0
    for i in range(n):
        if i % stride == 0 and k == F:
            k, stride = (k + 1) // 2, stride * 2
        k += i % stride == 0
    stack = [j * stride for j in range(k)]
    steps = 0
    for t in range(n - 1, -1, -1):
        p = stack[-1]
        while p < t:
            m = int(_binomial_advance(np.int64(p), np.int64(t), np.int64(c - len(stack)),
                                      np, _python_loop))
            steps += m - p
            if m < t:
                stack.append(m)
            p = m
        if stack[-1] == t:
            stack.pop()
    return steps


# --- the rule -----------------------------------------------------------------------------------
def _runner(jaxpr, consts):
    """``run(args) -> outs`` evaluating an open jaxpr (nothing differentiated)."""
    return lambda args: vjp_jaxpr(jaxpr, consts, list(args), [False] * len(args))[0]


@register_fwd_bwd(prims.while_p)
def _while_fwd_bwd(primals, active, *, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    cond, cond_inner_consts = compat.open_jaxpr(cond_jaxpr)
    body, body_inner_consts = compat.open_jaxpr(body_jaxpr)
    n_cc, n_bc = cond_nconsts, body_nconsts
    cconsts, bconsts = list(primals[:n_cc]), list(primals[n_cc:n_cc + n_bc])
    init = list(primals[n_cc + n_bc:])
    bc_active = list(active[n_cc:n_cc + n_bc])
    carry_active = carry_activity(body, bc_active, list(active[n_cc + n_bc:]))
    run_cond = _runner(cond, cond_inner_consts)
    run_body = _runner(body, body_inner_consts)
    step = lambda x: run_body(bconsts + list(x))  # noqa: E731

    if not any(carry_active):  # nothing differentiable leaves the loop
        outs = prims.while_p.bind(*primals, cond_jaxpr=cond_jaxpr, body_jaxpr=body_jaxpr,
                                  cond_nconsts=cond_nconsts, body_nconsts=body_nconsts)
        return list(outs), lambda cts: [None] * len(primals)

    c = _checkpoint_count(init)
    F = _forward_slots(c)
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731

    # Forward: run the loop, keep x_0, x_s, x_2s, ... in at most F slots (thinned when full).
    def thin(buffers):
        return [lax.dynamic_update_slice_in_dim(b, b[0:F:2], 0, axis=0) for b in buffers]

    def fwd_body(state):
        i, stride, k, buffers, x = state
        full = (i % stride == 0) & (k == F)
        buffers = lax.cond(full, thin, lambda b: list(b), buffers)
        stride = jnp.where(full, stride * 2, stride)
        k = jnp.where(full, (F + 1) // 2, k)
        # Slot k is the next free one (slot F is scratch when no checkpoint is due).
        buffers = [lax.dynamic_update_index_in_dim(b, xj, k, axis=0) for b, xj in zip(buffers, x)]
        k = k + (i % stride == 0).astype(jnp.int32)
        return i + 1, stride, k, buffers, step(x)

    buffers = [jnp.zeros((c,) + np.shape(x), compat.typeof(x).dtype) for x in init]
    n, stride, k, buffers, outs = lax.while_loop(
        lambda s: run_cond(cconsts + list(s[4]))[0], fwd_body,
        (i32(0), i32(1), i32(0), buffers, init))
    outs = list(outs)

    mask = bc_active + carry_active
    act_bc = [j for j, a in enumerate(bc_active) if a]
    act_carry = [j for j, a in enumerate(carry_active) if a]

    def reverse_step(x, ct_carry):
        """Cotangents of (active body consts, active carry) at state ``x`` for one iteration."""
        _, backward, _ = vjp_jaxpr(body, body_inner_consts, bconsts + list(x), mask)
        cts = [None] * len(init)
        for j, ct in zip(act_carry, ct_carry):
            cts[j] = ct
        cts_in = backward(cts)
        ct_bc = [instantiate_zeros(cts_in[j], bconsts[j]) for j in act_bc]
        ct_x = [instantiate_zeros(cts_in[n_bc + j], x[j]) for j in act_carry]
        return ct_bc, ct_x

    def pullback(cts):
        ct_carry = [instantiate_zeros(cts[j], outs[j]) for j in act_carry]
        acc = [jnp.zeros(np.shape(bconsts[j]), compat.typeof(bconsts[j]).dtype) for j in act_bc]
        positions = jnp.arange(c, dtype=jnp.int32) * stride

        def bwd_body(state):
            t, top, positions, buffers, ct_carry, acc = state

            def advance(adv):  # from the top checkpoint p to x_t, pushing revolve's checkpoints
                p, x, top, positions, buffers = adv
                m = _binomial_advance(p, t, c - 1 - top, jnp, lax.while_loop)
                x = lax.fori_loop(p, m, lambda _, x: step(x), list(x))
                push = m < t  # x_t itself is used at once, never stored
                buffers = [lax.dynamic_update_index_in_dim(b, xj, top + 1, axis=0)
                           for b, xj in zip(buffers, x)]
                positions = positions.at[top + 1].set(m)
                return m, x, top + push.astype(jnp.int32), positions, buffers

            x = [lax.dynamic_index_in_dim(b, top, axis=0, keepdims=False) for b in buffers]
            _, x, top, positions, buffers = lax.while_loop(
                lambda adv: adv[0] < t, advance, (positions[top], x, top, positions, buffers))
            ct_bc, ct_carry = reverse_step(x, ct_carry)
            acc = [a + g for a, g in zip(acc, ct_bc)]
            top = top - (positions[top] == t).astype(jnp.int32)
            return t - 1, top, positions, buffers, ct_carry, acc

        _, _, _, _, ct_init, acc = lax.while_loop(
            lambda s: s[0] >= 0, bwd_body,
            (n - 1, k - 1, positions, buffers, ct_carry, acc))
        result = [None] * len(primals)
        for j, ct in zip(act_bc, acc):
            result[n_cc + j] = ct
        for j, ct in zip(act_carry, ct_init):
            result[n_cc + n_bc + j] = ct
        return result

    return outs, pullback

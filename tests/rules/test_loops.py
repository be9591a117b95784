"""Table for bpkit/rules/loops.py (the ``while`` rule): ``jax.grad`` cannot differentiate a
``while_loop``, so each case also carries its *twin*, the same computation written with
``scan`` for the trip count known in advance (counted by running the loop first), and the
reference is ``jax.grad`` of the twin. Also checked: the twin computes the same value, float64
finite differences of the while version itself, second derivatives, the exact number of body
evaluations the documented schedule predicts, and the ``while_checkpoints`` settings.
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpkit
from bpkit.rules import loops
from tests.rules.harness import Case, args, const, normal, scalarize, uniform


@dataclass(frozen=True)
class LoopCase(Case):
    twin: Callable | None = None  # counts -> the same function, with scans of those lengths
    trip_count: Callable | None = None  # (*args) -> counts (what twin needs), run eagerly


def loop_case(name, init, cond, body, out, make_args, wrap=lambda f: f, **kwargs) -> LoopCase:
    """A case for ``out(p, while_loop(cond(p, .), body(p, .), init(p)))`` (passed through
    ``wrap``, e.g. ``jax.jit``); the twin scans ``body`` for the trip count."""
    @wrap
    def fun(*p):
        return out(p, lax.while_loop(lambda c: cond(p, c), lambda c: body(p, c), init(p)))

    def twin(n):
        def scanned(*p):
            carry, _ = lax.scan(lambda c, _: (body(p, c), None), init(p), None, length=n)
            return out(p, carry)
        return scanned

    def trip_count(*p):
        _, k = lax.while_loop(lambda s: cond(p, s[0]), lambda s: (body(p, s[0]), s[1] + 1),
                              (init(p), 0))
        return int(k)

    return LoopCase(name, fun, make_args, twin=twin, trip_count=trip_count, **kwargs)


# --- fixed point to a tolerance (the tolerance is a cond constant: no cotangent) ---------------
def _fixed_point_body(p, c):
    w, b, x0, tol = p
    x, _ = c
    new = 0.5 * jnp.tanh(w @ x + b) + 0.25 * x0
    return new, jnp.max(jnp.abs(new - x))


FIXED_POINT = loop_case(
    "fixed_point_to_tolerance",
    init=lambda p: (p[2], jnp.asarray(jnp.inf, p[2].dtype)),
    cond=lambda p, c: c[1] > p[3],
    body=_fixed_point_body,
    out=lambda p, c: c[0],
    make_args=args(uniform(4, 4, lo=-0.5, hi=0.5), normal(4), normal(4), const(1e-4)),
    argnums=(0, 1, 2, 3), dtypes=("float64",))


# --- adaptive Dormand-Prince (RK45) solve of a small neural ODE ---------------------------------
_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
      [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]]
_B_ERR = [35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
          -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40]


def dopri5_step(f, y, h):
    """One Dormand-Prince 5(4) step: ``(y5, error estimate)``."""
    ks = []
    for row in _A:
        ks.append(f(y + h * sum((a * k for a, k in zip(row, ks)), jnp.zeros_like(y))))
    y5 = y + h * sum((a * k for a, k in zip(_A[-1], ks)), jnp.zeros_like(y))
    return y5, h * sum((e * k for e, k in zip(_B_ERR, ks)), jnp.zeros_like(y))


def _ode_attempt(p, c, t_end=1.0, rtol=1e-5, atol=1e-7):
    """One attempted step with step-size control; carry ``(t, y, h, rejected)``."""
    w1, b1, w2, _ = p
    t, y, h, rejected = c
    y5, err = dopri5_step(lambda y: w2 @ jnp.tanh(w1 @ y + b1), y, h)
    scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y5))
    err_norm = jnp.sqrt(jnp.mean((err / scale) ** 2))
    accept = err_norm <= 1.0
    factor = jnp.clip(0.9 * jnp.maximum(err_norm, 1e-10) ** -0.2, 0.2, 5.0)
    t = jnp.where(accept, t + h, t)
    return (t, jnp.where(accept, y5, y), jnp.minimum(h * factor, t_end - t),
            rejected + (~accept).astype(jnp.int32))


NEURAL_ODE = loop_case(
    "adaptive_rk45_neural_ode",
    init=lambda p: (jnp.zeros((), p[3].dtype), p[3], jnp.asarray(0.1, p[3].dtype), 0),
    cond=lambda p, c: c[0] < 1.0,
    body=_ode_attempt,
    out=lambda p, c: c[1],
    make_args=args(normal(8, 2), normal(8), normal(2, 8), normal(2)),
    argnums=(0, 1, 2, 3), dtypes=("float64",))


# --- a trip count that depends on the parameters; a zero-trip loop -----------------------------
GROWTH = loop_case(
    "trip_count_depends_on_params",
    init=lambda p: p[1],
    cond=lambda p, x: jnp.sum(x) < 10.0,
    body=lambda p, x: x * p[0] + 0.1 * jnp.sin(x),
    out=lambda p, x: x,
    make_args=args(uniform(lo=1.2, hi=1.5), uniform(3, lo=0.5, hi=1.0)),
    argnums=(0, 1))

ZERO_TRIP = loop_case(
    "zero_trip",
    init=lambda p: p[1],
    cond=lambda p, x: jnp.sum(x) > 100.0,
    body=lambda p, x: jnp.tanh(x * p[0]),
    out=lambda p, x: x * x,
    make_args=args(uniform(3), uniform(3)),
    argnums=(0, 1))


# --- fori_loop with traced bounds (a while with an integer counter) ----------------------------
def _fori(w, x, n):
    return lax.fori_loop(0, n, lambda i, x: jnp.tanh(w @ x) + 0.1 * i.astype(x.dtype), x)


def _fori_twin(n):
    def scanned(w, x, _):
        def step(x, i):
            return jnp.tanh(w @ x) + 0.1 * i.astype(x.dtype), None
        return lax.scan(step, x, jnp.arange(n))[0]
    return scanned


FORI = LoopCase("fori_loop_traced_bounds", _fori,
                args(uniform(3, 3, lo=-1, hi=1), normal(3), const(np.int32(6))),
                argnums=(0, 1), twin=_fori_twin, trip_count=lambda w, x, n: int(n))


# --- nested loops, a while inside scan and inside cond; trip counts vary per outer step ---------
def _grow(w, x):
    """A while whose trip count depends on both ``w`` and the state it starts from."""
    return lax.while_loop(lambda x: jnp.sum(x) < 4.0, lambda x: x * w + 0.05, x)


def _grow_scan(w, x, n):
    return lax.scan(lambda x, _: (x * w + 0.05, None), x, None, length=n)[0]


def _grow_count(w, x):
    _, k = lax.while_loop(lambda s: jnp.sum(s[0]) < 4.0, lambda s: (s[0] * w + 0.05, s[1] + 1),
                          (x, 0))
    return int(k)


def _nested(w, x):
    return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, 0.3 * _grow(w, c[1])),
                          (0, x))[1]


def _nested_counts(w, x):
    counts = []
    for _ in range(3):
        counts.append(_grow_count(w, x))
        x = 0.3 * _grow(w, x)
    return counts


def _nested_twin(counts):
    def unrolled(w, x):
        for n in counts:
            x = 0.3 * _grow_scan(w, x, n)
        return x
    return unrolled


def _in_scan(w, x, xs):
    return lax.scan(lambda c, x: (0.3 * _grow(w, c + x), c), x, xs)


def _in_scan_counts(w, x, xs):
    counts = []
    for row in xs:
        counts.append(_grow_count(w, x + row))
        x = 0.3 * _grow(w, x + row)
    return counts


def _in_scan_twin(counts):
    def unrolled(w, x, xs):
        ys = []
        for n, row in zip(counts, xs):
            ys.append(x)
            x = 0.3 * _grow_scan(w, x + row, n)
        return x, jnp.stack(ys)
    return unrolled


def _in_cond(w, x):
    return lax.cond(jnp.sum(x) > 0, lambda x: _grow(w, x), lambda x: x * w, x)


def _in_cond_twin(n):
    return lambda w, x: lax.cond(jnp.sum(x) > 0, lambda x: _grow_scan(w, x, n),
                                 lambda x: x * w, x)


_W_X = args(uniform(lo=1.3, hi=1.6), uniform(3, lo=0.5, hi=1.0))

NESTED = LoopCase("nested_while_in_while", _nested, _W_X, argnums=(0, 1),
                  twin=_nested_twin, trip_count=_nested_counts)
IN_SCAN = LoopCase("while_in_scan", _in_scan,
                   args(uniform(lo=1.3, hi=1.6), uniform(3, lo=0.5, hi=1.0),
                        uniform(3, 3, lo=0.0, hi=0.5)),
                   argnums=(0, 1, 2), twin=_in_scan_twin, trip_count=_in_scan_counts)
IN_COND = LoopCase("while_in_cond", _in_cond, _W_X, argnums=(0, 1),
                   twin=_in_cond_twin, trip_count=_grow_count)
IN_JIT = loop_case(
    "while_in_jit",
    init=lambda p: p[1], cond=lambda p, x: jnp.sum(x) < 10.0,
    body=lambda p, x: jax.jit(lambda x: x * p[0] + 0.1 * jnp.sin(x))(x),
    out=lambda p, x: x, make_args=args(uniform(lo=1.2, hi=1.5), uniform(3, lo=0.5, hi=1.0)),
    argnums=(0, 1), wrap=jax.jit)

# One rule (while), so one row; the cases are the shapes of loops it must handle.
CASES = [FIXED_POINT, NEURAL_ODE, GROWTH, ZERO_TRIP, FORI, NESTED, IN_SCAN, IN_COND, IN_JIT]


# --- the runner -------------------------------------------------------------------------------
def _case_args(case, dtype):
    return case.make_args(np.random.default_rng(zlib.crc32(case.name.encode())), jnp.dtype(dtype))


def _assert_close(got, want, rtol):
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=rtol,
                                   atol=rtol * (1e-3 + float(np.max(np.abs(y), initial=0))))


def assert_loop_parity(case: LoopCase, dtype: str, jit: bool, checkpoints: int,
                       fd: bool = False) -> None:
    """bpkit.grad of the while version == jax.grad of its scan twin (== finite differences)."""
    a = _case_args(case, dtype)
    loss = scalarize(case.fun, a)
    twin_loss = scalarize(case.twin(case.trip_count(*a)), a)
    rtol = case.rtol or bpkit.check.DEFAULT_TOLERANCES[dtype]
    vg = bpkit.value_and_grad(loss, case.argnums, while_checkpoints=checkpoints)
    value, got = (jax.jit(vg) if jit else vg)(*a)
    twin_value, want = jax.jit(jax.value_and_grad(twin_loss, case.argnums))(*a)
    _assert_close(value, twin_value, rtol)  # the twin is the same computation
    _assert_close(got, want, rtol)
    if fd:  # float64 central differences of the while version itself, one direction per input
        loss64 = jax.jit(loss)
        rng = np.random.default_rng(0)
        for i, g_i in zip(case.argnums, got):
            v = rng.standard_normal(np.shape(a[i]))
            eps = 1e-6 * max(1.0, float(np.max(np.abs(a[i]))))
            shifted = lambda s: [x + s * v if j == i else x for j, x in enumerate(a)]  # noqa: E731
            fd = (float(loss64(*shifted(eps))) - float(loss64(*shifted(-eps)))) / (2 * eps)
            assert abs(fd - float(np.sum(np.asarray(g_i) * v))) <= 1e-5 * max(1.0, abs(fd))


# float64 (the trip counts of tolerance-driven loops must not depend on rounding), jitted with
# 3 checkpoints (revolve pushes checkpoints in the backward pass); eagerly with 2 (thinning and
# quadratic recomputation) for the cheaper cases, with finite differences.
SLOW_TO_COMPILE = {NEURAL_ODE.name}


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in SLOW_TO_COMPILE], ids=str)
def test_while_matches_jax_grad_of_the_scan_twin(case):
    assert_loop_parity(case, "float64", True, checkpoints=3)


@pytest.mark.parametrize("case", [GROWTH, ZERO_TRIP], ids=str)
def test_eager_with_finite_differences(case):
    assert_loop_parity(case, "float64", False, checkpoints=2, fd=True)


def test_adaptive_rk45_neural_ode():
    assert_loop_parity(NEURAL_ODE, "float64", True, checkpoints=4)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_eager_with_finite_differences_slow(case):
    assert_loop_parity(case, "float64", False, checkpoints=2, fd=True)


def test_float32_jitted():
    assert_loop_parity(FORI, "float32", True, checkpoints=4)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [2, 5, 16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_checkpoint_counts_slow(case, checkpoints):
    assert_loop_parity(case, "float64", True, checkpoints)


# --- second derivatives -------------------------------------------------------------------------
def test_second_derivative_of_a_parameter_dependent_loop():
    w, x = _case_args(GROWTH, "float64")
    twin = GROWTH.twin(GROWTH.trip_count(w, x))
    loss = lambda w, x: jnp.sum(GROWTH.fun(w, x) ** 2)  # noqa: E731
    twin_loss = lambda w, x: jnp.sum(twin(w, x) ** 2)  # noqa: E731
    got = jax.jit(bpkit.grad(bpkit.grad(loss, while_checkpoints=3), (0, 1)))(w, x)
    _assert_close(got, jax.grad(jax.grad(twin_loss), (0, 1))(w, x), 1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("case", [FIXED_POINT, NEURAL_ODE, NESTED], ids=str)
def test_hessian_vector_products_slow(case):
    a = _case_args(case, "float64")
    loss = scalarize(case.fun, a)
    twin_loss = scalarize(case.twin(case.trip_count(*a)), a)
    v = np.random.default_rng(1).standard_normal(np.shape(a[0]))

    def hvp(grad, f):
        return grad(lambda *p: jnp.sum(grad(f)(*p) * v), case.argnums)

    _assert_close(jax.jit(hvp(bpkit.grad, loss))(*a), jax.jit(hvp(jax.grad, twin_loss))(*a), 1e-8)


# --- the schedule: exact body evaluations, the stated bound -------------------------------------
@pytest.mark.parametrize("c", [3, 4, 8, 16, 33])
def test_recomputation_is_within_the_documented_bound(c):
    F = (c - 1) // 2
    for n in (1, 7, 100, 1000):
        segment, snaps = math.ceil(2 * n / F), c - F
        r = next(r for r in range(1, 10**6) if math.comb(snaps + r, r) >= segment)
        assert loops.recomputed_steps(n, c) <= r * n
    assert loops.recomputed_steps(23, 2) == 23 * 22 // 2  # one slot: from x_0 every time


# --- settings ----------------------------------------------------------------------------------
def _count_calls(grad_fn, *a):
    calls = []

    def loss(w, x):
        def body(x):
            jax.debug.callback(lambda: calls.append(1))
            return x * w
        return jnp.sum(lax.while_loop(lambda x: jnp.sum(x) < 50.0, body, x))

    jax.block_until_ready(grad_fn(loss)(*a))
    return len(calls)


def test_while_checkpoints_settings():
    """The compiled gradient evaluates the body exactly ``2n + R(n, c)`` times (n forward, n
    body VJPs, R(n, c) recomputations from ``recomputed_steps``) for the ``c`` in force."""
    a = (jnp.float64(1.5), jnp.ones(3))  # 7 iterations
    n, R = 7, loops.recomputed_steps
    default = _count_calls(lambda f: jax.jit(bpkit.grad(f)), *a)
    assert default == 2 * n + R(n, loops.DEFAULT_CHECKPOINTS)
    # bound to the function: holds when jit traces it later, outside any block
    assert _count_calls(lambda f: jax.jit(bpkit.grad(f, while_checkpoints=2)), *a) == 2 * n + R(n, 2)
    with bpkit.while_checkpoints(2):  # a block: applies to what is traced inside it
        assert _count_calls(lambda f: jax.jit(bpkit.grad(f)), *a) == 2 * n + R(n, 2)
    with bpkit.while_checkpoints(max_bytes=3 * 3 * 8 + 7):  # three float64[3] states fit
        assert loops._checkpoint_count([jnp.ones(3)]) == 3
        assert loops._checkpoint_count([jnp.ones(3), jnp.int64(0)]) == 2  # 32 bytes a state
        with bpkit.while_checkpoints(4):  # the innermost setting applies
            assert loops._checkpoint_count([jnp.ones(3)]) == 4
    assert loops._checkpoint_count([jnp.ones(3)]) == loops.DEFAULT_CHECKPOINTS


@pytest.mark.parametrize("bad", [dict(count=1), dict(count=2.5), dict(), dict(count=4, max_bytes=8),
                                 dict(max_bytes=0)])
def test_while_checkpoints_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match="while_checkpoints"):
        bpkit.while_checkpoints(**bad)
    if "count" in bad and len(bad) == 1:
        with pytest.raises(ValueError, match="while_checkpoints"):
            bpkit.grad(jnp.sum, while_checkpoints=bad["count"])


def test_vjp_with_inactive_integer_and_key_carries():
    """Only the carries that depend on the inputs get cotangents (an integer counter, a PRNG key
    and a float that never meets the inputs get none); ``vjp`` with a cotangent on every float
    output gives what the scan twin gives."""
    def step(w, x, key):
        key, sub = jax.random.split(key)
        return x * w + 0.1 * jax.random.normal(sub, x.shape, x.dtype), key

    def f(w, x):
        def body(c):
            x, key = step(w, c[0], c[3])
            return x, c[1] + 1.0, c[2] + 1, key
        return lax.while_loop(lambda c: c[2] < 5, body, (x, jnp.zeros(2), 0, jax.random.key(1)))[:2]

    def twin(w, x):
        def body(c, _):
            x, key = step(w, c[0], c[2])
            return (x, c[1] + 1.0, key), None
        return lax.scan(body, (x, jnp.zeros(2), jax.random.key(1)), None, length=5)[0][:2]

    def out_and_cts(vjp, f, w, x, ct):
        out, f_vjp = vjp(f, w, x)
        return out, f_vjp(ct)

    a = (jnp.float64(0.9), jnp.arange(2.0), (jnp.ones(2), jnp.ones(2)))
    mine = functools.partial(bpkit.vjp, while_checkpoints=3)
    _assert_close(jax.jit(functools.partial(out_and_cts, mine, f))(*a),
                  jax.jit(functools.partial(out_and_cts, jax.vjp, twin))(*a), 1e-12)


def test_vmap_over_loops_of_different_lengths():
    """Batched, each loop runs its own number of iterations (the batched while runs the longest
    and masks the others); each gradient equals its own scan twin's."""
    ws, x = jnp.array([1.1, 1.4, 2.0]), jnp.full(3, 0.3)
    got = jax.jit(jax.vmap(bpkit.grad(lambda w, x: jnp.sum(_grow(w, x)), while_checkpoints=3),
                           (0, None)))(ws, x)
    counts = [_grow_count(w, x) for w in ws]
    assert len(set(counts)) == 3
    for w, n, g in zip(ws, counts, got):
        _assert_close(g, jax.grad(lambda w: jnp.sum(_grow_scan(w, x, n)))(w), 1e-12)


def test_traced_and_python_schedules_agree_even_for_huge_segments():
    """The traced rule and ``recomputed_steps`` share ``_binomial_advance``; int32 arithmetic
    must not overflow where the Python integers would not (segments up to 2**31 steps)."""
    rng = np.random.default_rng(0)
    p = rng.integers(0, 10**9, 200)
    t = np.minimum(p + (10 ** rng.uniform(0.3, 9.3, 200)).astype(np.int64), 2**31 - 2)
    snaps = rng.integers(1, 40, 200)  # 1: no spare slot (the loop is skipped)
    traced = jax.jit(jax.vmap(lambda p, t, s: loops._binomial_advance(p, t, s, jnp, lax.while_loop)))
    got = np.asarray(traced(*(jnp.asarray(v, jnp.int32) for v in (p, t, snaps))))
    want = [int(loops._binomial_advance(np.int64(a), np.int64(b), np.int64(s), np,
                                        loops._python_loop)) for a, b, s in zip(p, t, snaps)]
    np.testing.assert_array_equal(got, want)
    assert np.all((got > p) & (got <= t))

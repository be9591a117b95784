"""Parity table for bpkit/rules/control.py, row for row, plus checks that custom rules are used."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src import core as jax_core
from jax.custom_derivatives import linear_call
from jax.ad_checkpoint import checkpoint_name

import bpkit
from tests.rules.harness import Case, args, const, parametrize, assert_case_parity, uniform


# --- jit and calls ----------------------------------------------------------------------------
@jax.jit
def _inner(x, y):
    return jnp.sin(x) * y


@jax.jit
def _outer(x, y):
    return _inner(x, y) + jax.jit(lambda z: jnp.tanh(z) * 2)(x)


def _closed_call(x, y):
    """A ``closed_call`` equation (named ``eval_jaxpr`` from JAX 0.12 on), staged directly."""
    closed = jax.make_jaxpr(lambda a, b: jnp.sin(a) * b)(x, y)
    if jax_core.closed_call_p.name == "closed_call":
        from jax._src.lax.eval_jaxpr import eval_jaxpr_p  # stages a closed_call on JAX 0.10
        return eval_jaxpr_p.bind(x, y, jaxpr=closed)[0]
    return jax_core.closed_call_p.bind(x, y, call_jaxpr=closed)[0]


try:
    from jax.experimental.overlap import program_order
except ImportError:  # before JAX 0.11 (the case is skipped; the coverage test still traces it)
    program_order = None


def _program_order(x, y):
    """A ``program_order`` call (``jax.experimental.overlap``, JAX >= 0.11) with two outputs."""
    def body(a, b):
        return jnp.sin(a) * b, jnp.cos(b)

    first, second = (program_order(body, enforce=False) if program_order else body)(x, y)
    return first * second


# --- linear_call -------------------------------------------------------------------------------
def _scale(r, x):
    """Linear in ``x`` and symmetric, so it is its own transpose (for linear_call)."""
    return r * x


# --- remat -------------------------------------------------------------------------------------
def _block(w, x):
    return jnp.tanh(x @ w) @ w.T


def _named_block(w, x):
    h = checkpoint_name(jnp.tanh(x @ w), "hidden")
    return checkpoint_name(jnp.sin(h @ w.T), "out") * h


def _batched_block(w, x):
    """An unbatched dot (x @ w) and, inside a nested jit (``jnp.einsum``), a batched one."""
    h = jnp.tanh(x @ w)  # (B, T, d)
    return jnp.einsum("bij,bkj->bik", h, x) @ h  # (B, T, d)


CP = jax.checkpoint_policies


# --- custom_jvp --------------------------------------------------------------------------------
@jax.custom_jvp
def _clipped_square(x):
    return x * x


@_clipped_square.defjvp
def _clipped_square_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x * x, 2 * jnp.clip(x, -1.0, 1.0) * t  # deliberately not the true derivative


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _scaled(x, k):
    return x * k


@_scaled.defjvp
def _scaled_jvp(k, primals, tangents):
    return _scaled(primals[0], k), tangents[0] * k


@jax.custom_jvp
def _times_int(x, n):
    return x * n.astype(x.dtype)


_times_int.defjvp(lambda p, t: (_times_int(*p), t[0] * p[1].astype(p[0].dtype)))


@jax.custom_jvp
def _poly(x):
    return x * x * x


@_poly.defjvp
def _poly_jvp(primals, tangents):
    """A rule closing over an array constant (JAX 0.12 passes it as a leading jaxpr input)."""
    (x,), (t,) = primals, tangents
    coefs = jnp.asarray(np.array([3.0, 0.0, 0.0]), x.dtype)  # d/dx x^3 = 3 x^2 + 0 x + 0
    return _poly(x), t * jnp.polyval(coefs, x)


# --- custom_vjp --------------------------------------------------------------------------------
@jax.custom_vjp
def _double_grad(x, y):
    return jnp.sin(x) * y


def _double_grad_fwd(x, y):
    return jnp.sin(x) * y, (jnp.cos(x), jnp.sin(x), y)


def _double_grad_bwd(res, ct):
    cos_x, sin_x, y = res
    return 2 * ct * cos_x * y, 2 * ct * sin_x  # twice the true gradient


_double_grad.defvjp(_double_grad_fwd, _double_grad_bwd)


@jax.custom_vjp
def _clip_gradient(x):
    return x


_clip_gradient.defvjp(lambda x: (x, None), lambda _, ct: (jnp.clip(ct, -0.1, 0.1),))


# --- scan ----------------------------------------------------------------------------------------
def _rnn(w, h0, xs, reverse=False):
    def step(carry, x):
        h, n = carry
        h = jnp.tanh(h @ w + x["a"] * x["b"])
        return (h, n + 1), {"h": h, "n2": h * h.sum()}
    (h, n), ys = lax.scan(step, (h0, jnp.int32(0)), xs, reverse=reverse)
    return h * n.astype(h.dtype), ys


def _xs(rng, dtype):
    return {"a": jnp.asarray(rng.uniform(-1, 1, (5, 2, 3)), dtype),
            "b": jnp.asarray(rng.uniform(-1, 1, (5, 2, 3)), dtype)}


def _several_carries(a, b, xs):
    def step(c, x):
        a, b, k = c
        return (a * jnp.cos(x), b + a * x, k * 2), a * b
    (a, b, k), ys = lax.scan(step, (a, b, jnp.int32(1)), xs)
    return a + b * k.astype(a.dtype), ys


def _weight_products(w, u, xs):
    """Loop-invariant weights in products (``h @ w``, a transposed ``x @ w.T``, an einsum) and
    in non-product uses, whose cotangents the backward scan sums over the steps."""
    def step(h, x):
        h = jnp.tanh(h @ w + x @ w.T + jnp.einsum("bi,ij->bj", h, u) * u[0][None, :] + jnp.sum(w) * h)
        return h, h
    return lax.scan(step, jnp.full((2, 3), 0.1, w.dtype), xs)


def _nested_scan(w, xs):
    def outer(c, x_row):
        def inner(ci, x):
            return jnp.sin(ci * w + x), ci * x
        c2, ys = lax.scan(inner, c, x_row)
        return c2 + 0.5 * c, ys.sum()
    return lax.scan(outer, jnp.zeros_like(w), xs)


def _fori(x, w):
    return lax.fori_loop(0, 4, lambda i, c: jnp.sin(c * w) + c * i.astype(c.dtype), x)


def _fori_unrolled(x):
    return lax.fori_loop(0, 3, lambda i, c: c * c * 0.5 + c, x, unroll=True)


# --- cond / switch ---------------------------------------------------------------------------
def _cond(p, x, y):
    return lax.cond(p, lambda a, b: jnp.sin(a) * b, lambda a, b: a - jnp.exp(b), x, y)


def _switch(i, x, y):
    return lax.switch(i, [lambda a, b: a * b, lambda a, b: jnp.tanh(a) + b, lambda a, b: a - a],
                      x, y)


S = (3, 4)

CASES = [
    # jit and calls
    Case("jit_nested", _outer, args(uniform(*S), uniform(*S)), argnums=(0, 1)),
    Case("jit_with_int_and_static", jax.jit(lambda x, n: x * n.astype(x.dtype)),
         args(uniform(*S), const(jnp.int32(3)))),
    Case("closed_call", _closed_call, args(uniform(*S), uniform(*S)), argnums=(0, 1)),
    Case("program_order", _program_order, args(uniform(*S), uniform(*S)), argnums=(0, 1),
         marks=(pytest.mark.skipif(program_order is None,
                                   reason="program_order is new in JAX 0.11"),)),
    # remat
    Case("remat", jax.checkpoint(_block), args(uniform(3, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("remat_prevent_cse_false", jax.checkpoint(_block, prevent_cse=False),
         args(uniform(3, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("remat_policy_dots_saveable",
         jax.checkpoint(_block, policy=jax.checkpoint_policies.dots_saveable),
         args(uniform(3, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("remat_policy_nothing_saveable_in_scan",
         lambda w, xs: lax.scan(jax.checkpoint(lambda c, x: (jnp.tanh(c @ w + x), c.sum()),
                                               policy=jax.checkpoint_policies.nothing_saveable),
                                jnp.zeros(3, w.dtype), xs),
         args(uniform(3, 3), uniform(4, 3)), argnums=(0, 1)),
    Case("remat_policy_everything_saveable",
         jax.checkpoint(_block, policy=CP.everything_saveable),
         args(uniform(3, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("remat_policy_dots_with_no_batch_dims_nested_jit",
         jax.checkpoint(_batched_block, policy=CP.dots_with_no_batch_dims_saveable),
         args(uniform(3, 3, lo=-1, hi=1), uniform(2, 4, 3, lo=-1, hi=1)), argnums=(0, 1)),
    Case("remat_policy_save_only_these_names",
         jax.checkpoint(_named_block, policy=CP.save_only_these_names("hidden")),
         args(uniform(3, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("remat_policy_save_any_names_but_these",
         jax.checkpoint(_named_block, policy=CP.save_any_names_but_these("hidden")),
         args(uniform(3, 3), uniform(2, 3)), argnums=(0, 1)),
    Case("remat_policy_offload_saves_on_device",
         jax.checkpoint(_batched_block,
                        policy=CP.offload_dot_with_no_batch_dims("device", "pinned_host")),
         args(uniform(3, 3, lo=-1, hi=1), uniform(2, 4, 3, lo=-1, hi=1)), argnums=(0, 1)),
    # name
    Case("checkpoint_name", lambda x: checkpoint_name(jnp.sin(x), "s") * x, args(uniform(*S))),
    # custom_jvp
    Case("custom_jvp_relu", jax.nn.relu, args(uniform(*S))),
    Case("custom_jvp_relu_at_zero", jax.nn.relu, args(const(np.array([-1.0, 0.0, 0.0, 2.0]))),
         fd=False),
    Case("custom_jvp_gelu", jax.nn.gelu, args(uniform(*S))),
    Case("custom_jvp_gelu_exact", lambda x: jax.nn.gelu(x, approximate=False), args(uniform(*S))),
    Case("custom_jvp_softplus", jax.nn.softplus, args(uniform(*S))),
    Case("custom_jvp_logaddexp_one_active", lambda x, y: jnp.logaddexp(x, y),
         args(uniform(*S), uniform(*S))),
    Case("custom_jvp_silu", jax.nn.silu, args(uniform(*S))),
    Case("custom_jvp_logsumexp", lambda x: jax.nn.logsumexp(x, axis=1), args(uniform(*S))),
    Case("custom_jvp_user_rule", _clipped_square, args(uniform(*S, lo=-2, hi=2)), fd=False),
    Case("custom_jvp_int_argument", _times_int, args(uniform(*S), const(jnp.int32(3)))),
    Case("custom_jvp_nondiff_argnums", lambda x: _scaled(x, 3.0), args(uniform(*S))),
    Case("custom_jvp_rule_closes_over_array", _poly, args(uniform(*S))),
    # custom_vjp
    Case("custom_vjp_user_bwd", _double_grad, args(uniform(*S), uniform(*S)), argnums=(0, 1),
         fd=False),
    Case("custom_vjp_clip_gradient", lambda x: _clip_gradient(x * 3) ** 2, args(uniform(*S)),
         fd=False),
    # scan
    Case("scan_rnn_pytrees_int_counter", _rnn,
         lambda rng, dt: (jnp.asarray(rng.uniform(-1, 1, (3, 3)), dt),
                          jnp.asarray(rng.uniform(-1, 1, (2, 3)), dt), _xs(rng, dt)),
         argnums=(0, 1, 2)),
    Case("scan_rnn_reverse", functools.partial(_rnn, reverse=True),
         lambda rng, dt: (jnp.asarray(rng.uniform(-1, 1, (3, 3)), dt),
                          jnp.asarray(rng.uniform(-1, 1, (2, 3)), dt), _xs(rng, dt)),
         argnums=(0, 1, 2)),
    Case("scan_several_carries", _several_carries, args(uniform(3), uniform(3), uniform(4, 3)),
         argnums=(0, 1, 2)),
    Case("scan_no_xs_length", lambda c: lax.scan(lambda c, _: (jnp.sin(c) * 1.5, c), c, None,
                                                 length=4),
         args(uniform(3))),
    Case("scan_unrolled", lambda c, xs: lax.scan(lambda c, x: (c * x + 1, c), c, xs, unroll=2),
         args(uniform(3), uniform(5, 3)), argnums=(0, 1)),
    Case("scan_weight_products", _weight_products,
         args(uniform(3, 3, lo=-0.5, hi=0.5), uniform(3, 3, lo=-0.5, hi=0.5), uniform(5, 2, 3)),
         argnums=(0, 1, 2)),
    Case("scan_nested", _nested_scan, args(uniform(2), uniform(3, 4, 2)), argnums=(0, 1)),
    Case("fori_loop_static_bounds", _fori, args(uniform(3), uniform(3)), argnums=(0, 1)),
    Case("fori_loop_unrolled", _fori_unrolled, args(uniform(3, lo=-0.5, hi=0.5))),
    # cond / switch
    Case("cond_true", _cond, args(const(True), uniform(*S), uniform(*S)), argnums=(1, 2)),
    Case("cond_false", _cond, args(const(False), uniform(*S), uniform(*S)), argnums=(1, 2)),
    Case("switch", _switch, args(const(jnp.int32(1)), uniform(*S), uniform(*S)), argnums=(1, 2)),
    Case("switch_constant_branch", _switch, args(const(jnp.int32(2)), uniform(*S), uniform(*S)),
         argnums=(1, 2)),
    # linear_call
    Case("linear_call", lambda r, x: linear_call(_scale, _scale, r, jnp.tanh(x)) * x,
         args(uniform(*S), uniform(*S)), argnums=(1,)),
]


@parametrize(CASES)
def test_control(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


def test_relu_gradient_is_zero_at_zero():
    g = bpkit.grad(lambda x: jnp.sum(jax.nn.relu(x)))(jnp.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0])


def test_custom_vjp_runs_the_users_bwd():
    x, y = jnp.array([0.3, -1.2]), jnp.array([2.0, 0.5])
    loss = lambda x, y: jnp.sum(_double_grad(x, y))
    gx, gy = bpkit.grad(loss, (0, 1))(x, y)
    np.testing.assert_allclose(gx, 2 * jnp.cos(x) * y, rtol=1e-12)
    np.testing.assert_allclose(gy, 2 * jnp.sin(x), rtol=1e-12)


def test_custom_jvp_runs_the_users_rule():
    x = jnp.array([-3.0, 0.5, 2.0])
    g = bpkit.grad(lambda x: jnp.sum(_clipped_square(x)))(x)
    np.testing.assert_allclose(g, 2 * jnp.clip(x, -1, 1), rtol=1e-12)


def test_remat_recomputes_in_the_backward_pass():
    calls = []

    def f(w, x):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum(jnp.tanh(x @ w))

    w, x = jnp.ones((3, 3)) * 0.1, jnp.ones((2, 3))
    jax.block_until_ready(bpkit.grad(jax.checkpoint(f))(w, x))
    assert len(calls) == 2  # once forward, once recomputed in the backward pass


def test_linear_call_refuses_differentiated_residuals():
    f = lambda r, x: jnp.sum(linear_call(_scale, _scale, r, x))  # noqa: E731
    with pytest.raises(bpkit.UnsupportedPrimitiveError, match="residual"):
        bpkit.grad(f, (0, 1))(jnp.ones(3), jnp.ones(3))


def test_composite_and_second_order_through_optimize_remat_are_refused_like_jax():
    composite = lax.composite(lambda x: jnp.sin(x) * 2, name="bpkit_test.op")

    @jax.custom_vjp
    def sin_opt_remat(x):
        return jnp.sin(x)
    sin_opt_remat.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, ct: (c * ct,),
                         optimize_remat=True)
    twice = lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(sin_opt_remat(y) ** 2))(x))  # noqa: E731
    for f, name in ((lambda x: jnp.sum(composite(x)), "composite"), (twice, "remat_opt")):
        with pytest.raises(bpkit.UnsupportedPrimitiveError, match=name):
            bpkit.grad(f)(jnp.ones(3))
        with pytest.raises(Exception):  # noqa: B017  (JAX's own error types differ)
            jax.grad(f)(jnp.ones(3))


def _live_cotangent_free_primitives(jaxpr) -> list[str]:
    """Primitives of the equations of a backward jaxpr (input: the output cotangent) that its
    result needs but that do not read the cotangent: the recomputed forward (and the rules'
    own primal-only terms, such as ``1 - tanh(x)**2``)."""
    reads_ct = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "optimization_barrier":  # passes each operand through
            reads_ct.update(o for i, o in zip(eqn.invars, eqn.outvars) if i in reads_ct)
        elif any(v in reads_ct for v in eqn.invars if isinstance(v, jax_core.Var)):
            reads_ct.update(eqn.outvars)
    live = {v for v in jaxpr.outvars if isinstance(v, jax_core.Var)}
    recomputed = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
            if not any(v in reads_ct for v in eqn.outvars):
                recomputed.append(eqn.primitive.name)
    return recomputed


def test_remat_policy_saving_dots_recomputes_no_dot():
    w = jnp.linspace(-1, 1, 9).reshape(3, 3)
    x = jnp.linspace(-1, 1, 24).reshape(2, 4, 3)

    def recomputed(policy):
        f = jax.checkpoint(lambda w, x: jnp.sum(_batched_block(w, x) ** 2), policy=policy)
        _, pullback = bpkit.vjp(f, w, x)
        return _live_cotangent_free_primitives(jax.make_jaxpr(pullback)(jnp.ones(())).jaxpr)

    nothing = recomputed(CP.nothing_saveable)
    assert nothing.count("dot_general") == 3 and "tanh" in nothing
    assert recomputed(CP.dots_with_no_batch_dims_saveable).count("dot_general") == 2  # batched
    dots = recomputed(CP.dots_saveable)
    assert "dot_general" not in dots and "tanh" in dots  # the rest is still recomputed
    everything = recomputed(CP.everything_saveable)
    assert "dot_general" not in everything and "tanh" not in everything


def test_remat_policy_temp_memory_matches_jax():
    """XLA's temporary memory under each policy is at most jax.grad's, and checkpointing saves
    memory for bpkit wherever it does for jax.grad (XLA 0.10's CPU backend saves none)."""
    def loss(ws, x, remat):
        for w1, w2 in ws:
            x = remat(lambda x, w1, w2: x + jnp.tanh(jnp.tanh(x @ w1) @ w2))(x, w1, w2)
        return jnp.sum(x ** 2)

    key = iter(jax.random.split(jax.random.key(0), 9))
    ws = [(jax.random.normal(next(key), (32, 512)) * 0.1,
           jax.random.normal(next(key), (512, 32)) * 0.1) for _ in range(4)]
    x = jax.random.normal(next(key), (256, 32))

    def temp_bytes(engine, remat):
        step = jax.jit(engine(functools.partial(loss, remat=remat)))
        return step.lower(ws, x).compile().memory_analysis().temp_size_in_bytes

    plain = {e: temp_bytes(e, lambda f: f) for e in (bpkit.grad, jax.grad)}
    for policy in (CP.nothing_saveable, CP.dots_saveable):
        remat = functools.partial(jax.checkpoint, policy=policy)
        mem = {e: temp_bytes(e, remat) for e in (bpkit.grad, jax.grad)}
        assert mem[bpkit.grad] <= 1.05 * mem[jax.grad]
        if mem[jax.grad] < 0.9 * plain[jax.grad]:
            assert mem[bpkit.grad] < 0.9 * plain[bpkit.grad]



def test_scan_stacks_the_fewest_residuals_per_step(monkeypatch):
    """An LSTM step: the plain split of one step's forward and backward stacks 15 values per
    step (the gate values, products such as ``1 - f``, the step's input ``x`` again, ...). The
    cut stacks the 7 the backward cannot rebuild without a transcendental function: ``h`` and
    ``c`` coming in, the four gates and ``tanh(c)`` going out; the products are recomputed by
    arithmetic in the backward step, and ``x`` is read from the scan's own ``xs``. (On CPU the
    backward step also transposes ``h`` for ``wh``'s gradient: ``rules/linalg.py``.)"""
    from bpkit.rules import control
    plans, original = [], control._step_residuals
    monkeypatch.setattr(control, "_step_residuals",
                        lambda *a: plans.append(original(*a)) or plans[-1])
    hidden = 3

    def lstm(p, xs):
        def cell(carry, x):
            h, c = carry
            z = x @ p["wx"] + h @ p["wh"]
            i, f, o = (jax.nn.sigmoid(z[:, k * hidden:(k + 1) * hidden]) for k in (0, 1, 3))
            g = jnp.tanh(z[:, 2 * hidden:3 * hidden])
            c = f * c + i * g
            h = o * jnp.tanh(c)
            return (h, c), h
        _, hs = lax.scan(cell, (jnp.zeros((2, hidden)), jnp.zeros((2, hidden))), xs)
        return jnp.sum(hs ** 2)

    rng = np.random.default_rng(0)
    p = {"wx": jnp.asarray(rng.normal(size=(4, 4 * hidden)) / 2),
         "wh": jnp.asarray(rng.normal(size=(hidden, 4 * hidden)) / 2)}
    xs = jnp.asarray(rng.normal(size=(5, 2, 4)))
    grads = bpkit.grad(lstm)(p, xs)
    stacked, recompute, bwd_xs = plans[-1]
    assert [v.aval.shape for v in stacked] == [(2, hidden)] * 7
    assert [v.aval.shape for v in bwd_xs] == [(2, 4)]
    assert recompute and {e.primitive.name for e in recompute} <= {
        "sub", "mul", "add", "neg", "transpose", "optimization_barrier"}
    want = jax.grad(lstm)(p, xs)
    for k in p:
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-10)

"""jax.grad's calling convention: only the ``argnums`` arguments are traced; every other argument
reaches the function as the caller passed it (bools, strings, ints, callables, modules, concrete
arrays), eagerly and under jit; the trace cache keys on them as jax.jit keys static arguments."""
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpkit
from tests.numerics import user_numerics
from tests.test_engine import tree_allclose

W = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.linspace(0.1, 0.3, 3)}
X = jnp.linspace(-2.0, 2.0, 8).reshape(2, 4)


def loss(params, x, train, *, mode="mean", act=jnp.tanh, scale=1.0):
    """Python control flow on every non-differentiated argument."""
    h = act(x @ params["w"] + params["b"][None, :])
    if train:  # a Python bool, as in ``loss(params, batch, True)``
        h = h * 0.5
    reduce = {"mean": jnp.mean, "sum": jnp.sum}[mode]  # a string mode
    return reduce(h ** 2) * scale


def both(fun, *args, argnums=0, has_aux=False, **kwargs):
    """bpkit's and JAX's gradient of the same call, eagerly and under jit."""
    g_b = bpkit.grad(fun, argnums, has_aux=has_aux)(*args, **kwargs)
    g_j = jax.grad(fun, argnums, has_aux=has_aux)(*args, **kwargs)
    tree_allclose(g_b, g_j)
    return g_b


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_bool_positional_and_string_keyword(train, mode):
    both(loss, W, X, train, mode=mode)


def test_callable_and_python_scalar_arguments():
    both(loss, W, X, False, act=jax.nn.relu, scale=3)
    both(loss, W, X, True, act=lambda z: jnp.sin(z) * 2.0, scale=0.5)


@pytest.mark.parametrize("flag", ["deterministic", "is_training"])
def test_training_flag_keywords_under_jit(flag):
    def f(params, x, **kw):
        h = x @ params["w"]
        return jnp.sum(jnp.tanh(h) if kw[flag] else h)

    @functools.partial(jax.jit, static_argnames="on")
    def step(params, x, on):
        return bpkit.grad(f)(params, x, **{flag: on}), jax.grad(f)(params, x, **{flag: on})

    for on in (True, False):
        tree_allclose(*step(W, X, on))


def test_argnums_tuples_negative_and_has_aux_with_statics():
    def f(x, n, y, mode):
        out = jnp.sum(jnp.sin(x) * y ** n)
        return (out, {"n": n}) if mode == "aux" else out

    args = (X, 3, X[::-1] + 0.5)
    both(f, *args, "plain", argnums=(2, 0))
    both(f, *args, "plain", argnums=-2)
    g, aux = both(f, *args, "aux", argnums=(0, 2), has_aux=True)
    assert aux == {"n": 3}  # the aux sees the Python int as passed


def _looped(x, n):
    """``lax.fori_loop`` with a concrete bound is a scan (reverse-differentiable), and ``range``
    needs a concrete int: both only work when ``n`` reaches the function untraced."""
    y = lax.fori_loop(0, n, lambda i, c: jnp.sin(c) * 1.1, x)
    for _ in range(n):
        y = y + 0.1 * jnp.cos(y)
    return jnp.sum(y ** 2)


@pytest.mark.parametrize("n", [3, np.int32(2), jnp.int32(3)], ids=["int", "np_int", "jax_int"])
def test_concrete_int_bounds_for_fori_loop_and_range(n):
    both(_looped, X, n)


def test_concrete_int_bound_inside_vjp_closure():
    n = jnp.int32(3)
    out, fn = bpkit.vjp(lambda x: _looped(x, n), X)
    out_j, fn_j = jax.vjp(lambda x: _looped(x, n), X)
    tree_allclose((out, fn(jnp.ones(()))), (out_j, fn_j(jnp.ones(()))))


def test_value_and_grad_and_jit_with_batch_tracers():
    @functools.partial(jax.jit, static_argnums=2)
    def step(params, x, train):
        return (bpkit.value_and_grad(loss)(params, x, train, mode="sum"),
                jax.value_and_grad(loss)(params, x, train, mode="sum"))

    tree_allclose(*step(W, X, True))


# --- the trace cache ----------------------------------------------------------------------------
def test_statics_are_cache_keys_by_value():
    traces = []

    def f(params, x, train, mode="mean"):
        traces.append((train, mode))
        return loss(params, x, train, mode=mode)

    g = bpkit.grad(f)
    for train in (True, True, False, True, False):
        g(W, X, train)
    assert traces == [(True, "mean"), (False, "mean")]
    g(W, X, 1)  # equal to True, but another type: jax.jit's static arguments tell them apart
    g(W, X, True, mode="sum")
    assert len(traces) == 4


def test_concrete_arrays_are_seen_as_passed_and_keyed_by_identity():
    seen = []

    def f(params, x, n):
        seen.append(int(n))  # a concrete value, as jax.grad gives it
        return jnp.sum(params["w"]) * x.sum() * n.astype(x.dtype)

    g = bpkit.grad(f)
    x, n = jnp.ones(3), jnp.int32(2)
    g(W, x, n)
    g(W, x, n)  # the same arrays: the cached trace
    assert seen == [2]
    tree_allclose(g(W, x, jnp.int32(5)), jax.grad(f)(W, x, jnp.int32(5)))  # a new value
    assert seen[1:] == [5, 5]


def test_numpy_arguments_mutated_in_place_are_not_stale():
    def f(params, data):
        return jnp.sum(params["w"] * jnp.asarray(data).sum())

    data = np.ones((2, 2))
    g1 = bpkit.grad(f)(W, data)
    data *= 3.0  # the same object with new values: jax.grad sees them, so must bpkit
    tree_allclose(bpkit.grad(f)(W, data), jax.grad(f)(W, data))
    assert not np.allclose(g1["w"], jax.grad(f)(W, data)["w"])


# --- neural-network libraries ------------------------------------------------------------------
def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (an optional test dependency)")


@_needs("flax")
def test_flax_linen_module_passed_as_an_argument():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(5)(x)
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(1)(jax.nn.gelu(x))

    def flax_loss(params, model, x, train, key):
        out = model.apply(params, x, train, rngs={"dropout": key})
        return jnp.mean(out ** 2)

    with user_numerics():
        model, x, key = MLP(), jnp.ones((3, 4)), jax.random.key(0)
        params = model.init(key, x, False)
        for train in (True, False):
            g = bpkit.grad(flax_loss)(params, model, x, train, key)
            tree_allclose(g, jax.grad(flax_loss)(params, model, x, train, key),
                          rtol=1e-6, atol=1e-7)


@_needs("equinox")
def test_equinox_partitioned_static_half():
    import equinox as eqx

    def eqx_loss(params, static, x):
        model = eqx.combine(params, static)  # the static half holds jax.nn.relu
        return jnp.mean(jax.vmap(model)(x) ** 2)

    with user_numerics():
        model = eqx.nn.MLP(4, 2, 8, 2, activation=jax.nn.relu, key=jax.random.key(0))
        params, static = eqx.partition(model, eqx.is_array)
        x = jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)
        g = bpkit.grad(eqx_loss)(params, static, x)
        tree_allclose(g, jax.grad(eqx_loss)(params, static, x), rtol=1e-6, atol=1e-7)
        g_jit = jax.jit(bpkit.grad(eqx_loss), static_argnums=1)(params, static, x)
        tree_allclose(g_jit, g, rtol=1e-6, atol=1e-7)


@_needs("haiku")
def test_haiku_is_training_keyword():
    import haiku as hk

    def forward(x, is_training):
        x = hk.Linear(6)(x)
        if is_training:
            x = hk.dropout(hk.next_rng_key(), 0.3, x)
        return hk.Linear(1)(jnp.tanh(x))

    net = hk.transform(forward)

    def hk_loss(params, key, x, *, is_training):
        return jnp.mean(net.apply(params, key, x, is_training) ** 2)

    with user_numerics():
        key, x = jax.random.key(1), jnp.ones((3, 4))
        params = net.init(key, x, is_training=True)
        for on in (True, False):
            tree_allclose(bpkit.grad(hk_loss)(params, key, x, is_training=on),
                          jax.grad(hk_loss)(params, key, x, is_training=on),
                          rtol=1e-6, atol=1e-7)

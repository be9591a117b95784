"""The public API behaves like JAX's: signatures, pytrees, integer and key inputs, errors,
jit/vmap composition, higher order, and trace caching."""
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import bpkit


def tree_allclose(a, b, rtol=1e-10, atol=1e-12):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.shape(x) == np.shape(y)
        assert jnp.asarray(x).dtype == jnp.asarray(y).dtype, (x.dtype, y.dtype)
        if jnp.asarray(x).dtype == jax.dtypes.float0:
            continue
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def f2(x, y):
    return jnp.sum(jnp.sin(x) * y ** 2)


X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
Y = jnp.linspace(0.5, 2.0, 6).reshape(2, 3)


# --- argnums and has_aux ----------------------------------------------------------------------
@pytest.mark.parametrize("argnums", [0, 1, (0,), (1, 0), (0, 1)])
def test_argnums(argnums):
    tree_allclose(bpkit.grad(f2, argnums)(X, Y), jax.grad(f2, argnums)(X, Y))
    tree_allclose(bpkit.value_and_grad(f2, argnums)(X, Y), jax.value_and_grad(f2, argnums)(X, Y))


def test_bad_argnums():
    with pytest.raises(TypeError):
        bpkit.grad(f2, 2)(X, Y)


def test_has_aux_grad_and_value_and_grad():
    def f(x, y):
        return jnp.sum(x * y), {"mean": jnp.mean(x), "n": 3}
    g, aux = bpkit.grad(f, has_aux=True)(X, Y)
    g_j, aux_j = jax.grad(f, has_aux=True)(X, Y)
    tree_allclose(g, g_j)
    tree_allclose(aux, jax.tree_util.tree_map(jnp.asarray, aux_j))
    (v, aux), g = bpkit.value_and_grad(f, (0, 1), has_aux=True)(X, Y)
    (v_j, aux_j), g_j = jax.value_and_grad(f, (0, 1), has_aux=True)(X, Y)
    tree_allclose((v, g), (v_j, g_j))


def test_has_aux_vjp():
    f = lambda x: (jnp.sin(x), jnp.cos(x).sum())  # noqa: E731
    out, fn, aux = bpkit.vjp(f, X, has_aux=True)
    out_j, fn_j, aux_j = jax.vjp(f, X, has_aux=True)
    ct = jnp.ones_like(out) * 0.5
    tree_allclose((out, fn(ct), aux), (out_j, fn_j(ct), aux_j))


def test_vjp_multiple_outputs_and_structure():
    f = lambda a, b: {"s": a * b, "t": (jnp.exp(a), b.sum())}  # noqa: E731
    out, fn = bpkit.vjp(f, X, Y)
    out_j, fn_j = jax.vjp(f, X, Y)
    ct = jax.tree_util.tree_map(lambda o: jnp.full_like(o, 0.3), out)
    tree_allclose(fn(ct), fn_j(ct))


def test_vjp_cotangent_structure_mismatch_raises():
    _, fn = bpkit.vjp(lambda x: (x, x), X)
    with pytest.raises(TypeError):
        fn(X)


# --- pytrees ------------------------------------------------------------------------------------
class Params(NamedTuple):
    w: jax.Array
    b: jax.Array


def test_nested_pytrees_keep_their_structure():
    params = {"layers": [Params(X, Y[0]), Params(Y.T, X[:, 0])], "scale": (jnp.float64(2.0),)}

    def loss(p, x):
        h = x
        for layer in p["layers"]:
            h = jnp.tanh(h @ layer.w + layer.b[None, :])
        return jnp.sum(h) * p["scale"][0]

    x = jnp.ones((4, 2))
    g = bpkit.grad(loss)(params, x)
    assert isinstance(g["layers"][0], Params)
    tree_allclose(g, jax.grad(loss)(params, x))


def test_python_scalar_arguments():
    f = lambda x, y: x * jnp.sin(y) + jnp.dot(x, y)  # noqa: E731
    tree_allclose(bpkit.grad(f, (0, 1))(2.0, 3.0), jax.grad(f, (0, 1))(2.0, 3.0))


def test_kwargs_are_not_differentiated():
    f = lambda x, *, scale: jnp.sum(x * scale)  # noqa: E731
    tree_allclose(bpkit.grad(f)(X, scale=Y), jax.grad(f)(X, scale=Y))


# --- integer arguments and PRNG keys ----------------------------------------------------------
def loss_with_int_and_key(w, n, key):
    noise = jax.random.normal(key, w.shape, w.dtype)
    return jnp.sum((w + noise) ** 2) * n.astype(w.dtype)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_integer_and_key_inputs(make_key):
    args = (X, jnp.int32(3), make_key(0))
    tree_allclose(bpkit.grad(loss_with_int_and_key)(*args),
                  jax.grad(loss_with_int_and_key)(*args))


def test_grad_wrt_int_raises_type_error_like_jax():
    args = (X, jnp.int32(3), jax.random.key(0))
    with pytest.raises(TypeError, match="allow_int"):
        jax.grad(loss_with_int_and_key, 1)(*args)
    with pytest.raises(TypeError, match="allow_int"):
        bpkit.grad(loss_with_int_and_key, 1)(*args)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_allow_int_gives_float0(make_key):
    args = (X, jnp.int32(3), make_key(0))
    g = bpkit.grad(loss_with_int_and_key, (0, 1, 2), allow_int=True)(*args)
    g_j = jax.grad(loss_with_int_and_key, (0, 1, 2), allow_int=True)(*args)
    assert g[1].dtype == jax.dtypes.float0 and g[2].dtype == jax.dtypes.float0
    tree_allclose(g, g_j)


def test_vjp_gives_float0_for_integer_inputs():
    f = lambda x, n: x * n.astype(x.dtype)  # noqa: E731
    n = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    _, fn = bpkit.vjp(f, X, n)
    _, fn_j = jax.vjp(f, X, n)
    ct = jnp.ones_like(X)
    g, g_j = fn(ct), fn_j(ct)
    assert g[1].dtype == jax.dtypes.float0 and g[1].shape == (2, 3)
    tree_allclose(g, g_j)


# --- output checks ------------------------------------------------------------------------------
def test_non_scalar_output_raises_type_error():
    with pytest.raises(TypeError, match="scalar"):
        bpkit.grad(jnp.sin)(X)
    with pytest.raises(TypeError):
        bpkit.grad(lambda x: (x.sum(), x.sum()))(X)


def test_integer_output_raises_type_error():
    with pytest.raises(TypeError):
        bpkit.grad(lambda x: jnp.sum(x).astype(jnp.int32))(X)


# --- jit, vmap, composition ---------------------------------------------------------------------
def mlp_loss(params, x, y):
    h = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
    logits = h @ params["w2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def mlp_params(key, d_in=5, d_h=7, d_out=3):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (d_in, d_h)) * 0.5, "b1": jnp.full((d_h,), 0.1),
            "w2": jax.random.normal(k2, (d_h, d_out)) * 0.5}


def mlp_batch(key, n=8, d_in=5, d_out=3):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (n, d_in)), jax.random.randint(k2, (n,), 0, d_out)


def test_jit_of_grad_equals_eager():
    p, (x, y) = mlp_params(jax.random.key(0)), mlp_batch(jax.random.key(1))
    eager = bpkit.grad(mlp_loss)(p, x, y)
    tree_allclose(jax.jit(bpkit.grad(mlp_loss))(p, x, y), eager)
    tree_allclose(eager, jax.grad(mlp_loss)(p, x, y))


def test_grad_inside_jit():
    p, (x, y) = mlp_params(jax.random.key(0)), mlp_batch(jax.random.key(1))

    @jax.jit
    def step(p, x, y):
        g = bpkit.grad(mlp_loss)(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g)

    @jax.jit
    def step_j(p, x, y):
        g = jax.grad(mlp_loss)(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g)

    tree_allclose(step(p, x, y), step_j(p, x, y))


def test_vmap_per_example_gradients():
    p, (x, y) = mlp_params(jax.random.key(0)), mlp_batch(jax.random.key(1))
    per_example = lambda p, x, y: mlp_loss(p, x[None], y[None])  # noqa: E731
    g = jax.vmap(bpkit.grad(per_example), in_axes=(None, 0, 0))(p, x, y)
    g_j = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(p, x, y)
    assert g["w1"].shape == (8, 5, 7)
    tree_allclose(g, g_j)
    tree_allclose(jax.jit(jax.vmap(bpkit.grad(per_example), in_axes=(None, 0, 0)))(p, x, y), g_j)


def _scan_tanh(x):
    def step(c, w):
        return jnp.tanh(c * w + 0.3), c * w
    c, ys = lax.scan(step, x[0], x)
    return c + jnp.sum(jnp.sin(ys))


@pytest.mark.parametrize("f", [
    lambda x: jnp.sum(jnp.tanh(x) ** 3),
    lambda x: jnp.sum(jax.nn.softmax(x) * x),
    _scan_tanh,
], ids=["tanh", "softmax", "scan"])
def test_second_order(f):
    x = jnp.linspace(-0.7, 0.9, 5)
    h = lambda g: lambda x: jnp.sum(g(f)(x) * jnp.cos(x))  # noqa: E731
    tree_allclose(bpkit.grad(h(bpkit.grad))(x), jax.grad(h(jax.grad))(x), rtol=1e-9)
    tree_allclose(jax.grad(h(bpkit.grad))(x), jax.grad(h(jax.grad))(x), rtol=1e-9)


def test_scalar_second_derivative():
    f = lambda x: jnp.tanh(x) * jnp.exp(-x)  # noqa: E731
    x = jnp.float64(0.4)
    tree_allclose(bpkit.grad(bpkit.grad(f))(x), jax.grad(jax.grad(f))(x))
    tree_allclose(bpkit.grad(bpkit.grad(bpkit.grad(f)))(x), jax.grad(jax.grad(jax.grad(f)))(x))


def test_hessian_vector_product_via_vmap_of_grad():
    f = lambda x: jnp.sum(jnp.sin(x) * x ** 2)  # noqa: E731
    x = jnp.linspace(-1, 1, 4)
    hess = jax.vmap(lambda v: bpkit.grad(lambda x: jnp.vdot(bpkit.grad(f)(x), v))(x))(jnp.eye(4))
    tree_allclose(hess, jax.hessian(f)(x))


# --- tracing: caching and retracing -----------------------------------------------------------
def test_eager_calls_with_same_shapes_do_not_retrace():
    traces = []

    def f(x):
        traces.append(1)
        return jnp.sum(jnp.sin(x))

    g = bpkit.grad(f)
    for i in range(4):
        g(jnp.asarray(np.full(3, i, np.float64)))
    assert len(traces) == 1
    g(jnp.ones((4,)))  # new shape: one more trace
    assert len(traces) == 2
    bpkit.value_and_grad(f)(jnp.ones((3,)))  # same function, same shapes: cached
    assert len(traces) == 2


def test_jitted_train_step_traces_once():
    opt = optax.adam(1e-2)
    # Strongly typed inputs: weak-typed leaves would retrace under jax.grad just the same.
    strong = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), t)  # noqa
    p = strong(mlp_params(jax.random.key(0)))
    state = strong(opt.init(p))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(p, state, x, y):
        loss, g = bpkit.value_and_grad(mlp_loss)(p, x, y)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, loss

    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's adam mixes int32 counts and floats
        for i in range(5):
            x, y = mlp_batch(jax.random.key(10 + i))
            p, state, loss = train_step(p, state, x, y)
            losses.append(float(loss))
    assert all(np.isfinite(losses))
    chex.clear_trace_counter()

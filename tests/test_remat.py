"""remat="auto": the minimum-cut plan of which forward values the backward keeps.

Gradients equal the plain engine's (and jax.grad's) on every kind of program; the plan of small
programs equals the optimum derived by hand; compiled temporary memory falls; a budget
recomputes more; bad settings are refused with the fix.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import bpkit
from bpkit.config import ConfigError, config_from_dict
from bpkit.engine import core, remat
from bpkit.train import TrainState, make_train_step


def _normal(i, shape, dtype=jnp.float64):
    """Normal draws made by NumPy (no compile per shape while the module loads)."""
    return jnp.asarray(np.random.default_rng(i).standard_normal(shape), dtype)


def residual_mlp(params, x):
    """``h[l+1] = h[l] + gelu(tanh(h[l] W[l] + b[l]))``: the residual stream the plan must save."""
    h = x
    for w, b in params:
        h = h + jax.nn.gelu(jnp.tanh(h @ w + b[None, :]))
    return jnp.mean(h ** 2)


def attention_block(p, x):
    """Pre-LN self-attention with a softmax and a GELU MLP (what the GPT's blocks do)."""
    mu = jnp.mean(x, -1, keepdims=True)
    xn = (x - mu) * lax.rsqrt(jnp.var(x, -1, keepdims=True) + 1e-5)
    q, k, v = jnp.split(xn @ p["qkv"], 3, axis=-1)
    att = jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1]), axis=-1)
    x = x + (att @ v) @ p["proj"]
    return jnp.sum(jnp.tanh(x + jax.nn.gelu(x @ p["fc"]) @ p["fc_out"]) ** 2)


def rnn(p, xs):
    def cell(h, x):
        h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
        return h, jnp.sum(h ** 2)
    _, ys = lax.scan(cell, jnp.zeros((2, 4)), xs)
    return jnp.sum(ys)


def conv(p, x):
    y = lax.conv_general_dilated(x, p, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) * jnp.exp(-y ** 2))


@jax.custom_vjp
def _clip(x):
    return jnp.clip(x, -1.0, 1.0)


_clip.defvjp(lambda x: (_clip(x), x), lambda x, ct: (jnp.where(jnp.abs(x) <= 1.0, ct, 0.0),))


def with_custom_vjp_and_while(w, x):
    y = _clip(jnp.sin(x * w) * 3.0)
    _, y = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] * w)), (0, y))
    return jnp.sum(jnp.exp(y) * w)


@jax.custom_vjp
def exp_of_product(a, b):
    """``exp(a @ b)`` whose bwd recomputes the product from the saved ``a, b`` (as the fused
    attention recomputes ``q kᵀ``) instead of saving the ``(M, N)`` result."""
    return jnp.exp(a @ b)


def _exp_of_product_bwd(saved, ct):
    a, b = saved
    g = ct * jnp.exp(a @ b)
    return g @ b.T, a.T @ g


exp_of_product.defvjp(lambda a, b: (exp_of_product(a, b), (a, b)), _exp_of_product_bwd)


def with_recomputing_custom_vjp(a, b):
    return jnp.sum(exp_of_product(a, b) * jnp.arange(7.0)[None, :])


PROGRAMS = {
    "residual_mlp": (residual_mlp, ([(_normal(i, (6, 6)) / 3, _normal(10 + i, (6,)))
                                     for i in range(3)], _normal(20, (5, 6)))),
    "attention_block": (attention_block, ({"qkv": _normal(1, (8, 24)) / 3,
                                           "proj": _normal(2, (8, 8)) / 3,
                                           "fc": _normal(3, (8, 16)) / 3,
                                           "fc_out": _normal(4, (16, 8)) / 4}, _normal(5, (6, 8)))),
    "rnn_scan": (rnn, ({"wh": _normal(1, (4, 4)) / 2, "wx": _normal(2, (3, 4))},
                       _normal(3, (5, 2, 3)))),
    "conv": (conv, (_normal(1, (3, 3, 2, 3)) / 3, _normal(2, (2, 5, 5, 2)))),
    "custom_vjp_and_while": (with_custom_vjp_and_while, (_normal(1, (4,)), _normal(2, (4,)))),
    "recomputing_custom_vjp": (with_recomputing_custom_vjp, (_normal(1, (5, 4)) / 2,
                                                             _normal(2, (4, 7)) / 2)),
}


def _assert_trees_close(got, want, rtol=1e-10):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_gradients_equal_the_plain_engine_and_jax(name, jit):
    f, args = PROGRAMS[name]
    auto = bpkit.value_and_grad(f, argnums=(0, 1), remat="auto")
    auto = jax.jit(auto) if jit else auto
    value, grads = auto(*args)
    plain_value, plain = bpkit.value_and_grad(f, argnums=(0, 1))(*args)
    np.testing.assert_allclose(value, plain_value, rtol=1e-12)
    _assert_trees_close(grads, plain)
    if name != "custom_vjp_and_while":  # jax.grad refuses while loops
        _assert_trees_close(grads, jax.grad(f, argnums=(0, 1))(*args))


def _plan(f, *args, budget=None):
    flat, tree = jax.tree_util.tree_flatten((args, {}))
    traced = core.trace(f, flat, tree)
    return remat.plan_for(traced.jaxpr, traced.consts, flat, [True] * len(flat), budget, (0,))


def _saved_by(plan) -> list[str]:
    return sorted(plan.producer[v].primitive.name for v in plan.saved)


def test_plan_of_a_small_program_is_the_hand_derived_optimum():
    """``sum(sin(exp(x) @ w))``: the backward reads ``y = exp(x) @ w`` (for ``cos y``) and
    ``a = exp(x)`` (for ``w``'s gradient ``a^T dy`` and ``x``'s ``da * a``). ``y`` comes from a
    product, so it is saved; ``a`` is recomputed from the input ``x``, which is kept anyway.
    The optimum saves ``y`` alone: 4 x 3 float64 values, 96 bytes."""
    f = lambda x, w: jnp.sum(jnp.sin(jnp.exp(x) @ w))  # noqa: E731
    plan = _plan(f, _normal(1, (4, 5)), _normal(2, (5, 3)))
    assert _saved_by(plan) == ["dot_general"] and plan.saved_bytes == 4 * 3 * 8
    assert plan.saved[0].aval.shape == (4, 3)
    assert plan.required_bytes > plan.saved_bytes  # without the plan, exp(x) is kept too


def test_plan_of_a_residual_stream_saves_each_layer_input_once():
    """Each layer's product output is saved (it cannot be recomputed); so are ``h[2..L-1]``,
    because recomputing ``h[l]`` from ``h[l-1]`` would chain through earlier layers' ``h``, each
    read by a product of the backward (``W``'s gradient), and rebuild them all at once.
    ``h[1]`` is recomputed from the input ``h[0]`` and the first product (one link, rebuilt
    next to its reader)."""
    layers = 4
    params = [(_normal(i, (6, 6)) / 3, _normal(10 + i, (6,))) for i in range(layers)]
    plan = _plan(residual_mlp, params, _normal(20, (5, 6)))
    assert _saved_by(plan) == sorted(["add"] * (layers - 2) + ["dot_general"] * layers)
    assert plan.saved_bytes == (2 * layers - 2) * 5 * 6 * 8
    assert "saves 6 values" in plan.summary()


def test_a_custom_vjp_bwd_recomputes_its_product_in_the_backward():
    """``exp_of_product``'s bwd recomputes ``exp(a @ b)`` from its saved inputs. That product
    does not depend on the cotangent, but the function's output does not need it either: the
    plan leaves it to the backward (as the plain engine runs it) instead of computing it in the
    forward and saving the ``(5, 7)`` result. ``a``, ``b`` are inputs, kept anyway: nothing is
    saved."""
    plan = _plan(with_recomputing_custom_vjp, *PROGRAMS["recomputing_custom_vjp"][1])
    assert plan.saved == [] and plan.saved_bytes == 0
    assert plan.required_bytes >= 5 * 7 * 8  # the product the backward reads


def test_a_budget_recomputes_more_and_says_when_it_cannot_be_met():
    f, (params, x) = PROGRAMS["attention_block"]
    cheapest = _plan(f, params, x)
    roomy = _plan(f, params, x, budget=cheapest.saved_bytes)
    assert roomy.tier == 0 and _saved_by(roomy) == _saved_by(cheapest)
    tight = _plan(f, params, x, budget=cheapest.saved_bytes - 1)
    assert tight.tier > 0 and tight.saved_bytes < cheapest.saved_bytes
    with pytest.warns(UserWarning, match="remat_budget_bytes=0 cannot be met"):
        nothing = _plan(f, params, x, budget=0)
    assert nothing.tier == len(remat.TIERS) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = jax.jit(bpkit.grad(f, (0, 1), remat="auto", remat_budget_bytes=0))(params, x)
    _assert_trees_close(got, jax.grad(f, (0, 1))(params, x))


@pytest.mark.skipif(tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 12),
                    reason="XLA before JAX 0.12 merges a recomputation with the forward pass "
                           "(jax.checkpoint's too), so compiled memory cannot fall")
def test_compiled_temporary_memory_falls():
    layers, d = 8, 64
    params = [(_normal(i, (d, d), jnp.float32) / 8, jnp.zeros(d, jnp.float32))
              for i in range(layers)]
    x = _normal(99, (128, d), jnp.float32)

    def temp(**kw):
        step = jax.jit(bpkit.value_and_grad(residual_mlp, **kw))
        return step.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    assert temp(remat="auto") < 0.9 * temp()


def test_vjp_vmap_closures_and_second_order():
    f, (params, x) = PROGRAMS["attention_block"]
    out, pull = bpkit.vjp(lambda p: attention_block(p, x), params, remat="auto")
    _assert_trees_close(pull(jnp.ones_like(out))[0], jax.grad(f)(params, x))
    xs = jnp.stack([x, 2 * x])
    per_example = jax.vmap(bpkit.grad(f, remat="auto"), (None, 0))(params, xs)
    _assert_trees_close(per_example, jax.vmap(jax.grad(f), (None, 0))(params, xs))

    @jax.jit
    def closed_over(scale):  # the traced function closes over a tracer of this jit
        return bpkit.grad(lambda p: f(p, x * scale), remat="auto")(params)
    _assert_trees_close(closed_over(1.5), jax.grad(lambda p: f(p, x * 1.5))(params))
    g = lambda x: jnp.sum(jnp.tanh(jnp.sin(x) * x) ** 2)  # noqa: E731
    x1 = jnp.linspace(-1.0, 1.0, 5)
    second = bpkit.grad(lambda x: jnp.sum(bpkit.grad(g, remat="auto")(x) ** 2))(x1)
    _assert_trees_close(second, jax.grad(lambda x: jnp.sum(jax.grad(g)(x) ** 2))(x1))


def test_checkpoint_policy_names_and_has_aux():
    f, (params, x) = PROGRAMS["attention_block"]
    want = jax.grad(f)(params, x)
    by_name = bpkit.grad(f, remat="dots_with_no_batch_dims_saveable")(params, x)
    _assert_trees_close(by_name, want)
    aux_fn = lambda p, x: (f(p, x), {"norm": jnp.sum(x ** 2)})  # noqa: E731
    (value, aux), g = bpkit.value_and_grad(aux_fn, has_aux=True, remat="auto")(params, x)
    _assert_trees_close(g, want)
    np.testing.assert_allclose(aux["norm"], jnp.sum(x ** 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"remat": "sometimes"}, "is not a remat setting.*dots_with_no_batch_dims_saveable"),
    ({"remat": None, "remat_budget_bytes": 10}, "needs remat='auto'"),
    ({"remat": "auto", "remat_budget_bytes": -1}, "non-negative int of bytes"),
])
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bpkit.grad(jnp.sum, **kwargs)


def test_train_step_and_config():
    f, (params, x) = PROGRAMS["residual_mlp"]
    loss = lambda p, batch, key: f(p, batch)  # noqa: E731
    tx = optax.sgd(0.1)
    states = [make_train_step(loss, tx, remat=r, donate=False)(TrainState.create(params, tx), x)
              for r in (None, "auto")]
    _assert_trees_close(states[1][0].params, states[0][0].params)
    def problems(overrides):
        try:
            config_from_dict({}, overrides)
        except ConfigError as e:
            return e.problems
        return []
    assert problems(["run.remat=auto"]) == []
    assert problems(["run.remat=dots_saveable", "run.engine=jax"]) == []
    assert any("run.remat: auto is bpkit's own plan" in p
               for p in problems(["run.remat=auto", "run.engine=jax"]))
    assert any("run.remat" in p and "dots_with_no_batch_dims_saveable" in p
               for p in problems(["run.remat=often"]))
    assert any("run.remat_budget_bytes" in p and "set run.remat=auto" in p
               for p in problems(["run.remat_budget_bytes=1000"]))
    assert any("run.remat_budget_bytes" in p for p in problems(["run.remat_budget_bytes=-1"]))


"""Backward signals equal independently computed norms; warnings fire only when they should."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpkit.diagnostics import backward_signals, signal_warnings


def _init(key, depth, width):
    keys = jax.random.split(key, depth)
    return {f"layer_{i}": {"w": jax.random.normal(keys[i], (width, width)) / np.sqrt(width),
                           "b": jnp.zeros(width)} for i in range(depth)}


def _loss(params, x, act, perturb=None):
    h = x
    for i in range(len(params)):
        with jax.named_scope(f"layer_{i}"):
            p = params[f"layer_{i}"]
            h = act(h @ p["w"] + p["b"][None, :])
        if perturb is not None:
            h = h + perturb[i]
    return jnp.sum(h ** 2)


@pytest.mark.parametrize("jit", [False, True])
def test_signals_equal_perturbation_gradients(jit):
    params = _init(jax.random.key(0), 5, 8)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    fn = backward_signals(lambda p, x: _loss(p, x, jnp.tanh))
    value, grads, signals = (jax.jit(fn) if jit else fn)(params, x)
    # Independent reference: jax.grad with respect to a zero perturbation of each layer output.
    zeros = [jnp.zeros((4, 8))] * 5
    ref = jax.grad(lambda e: _loss(params, x, jnp.tanh, e))(zeros)
    assert list(signals) == [f"layer_{i}" for i in range(5)]
    for i, name in enumerate(signals):
        np.testing.assert_allclose(float(signals[name].activation_grad_norm),
                                   float(jnp.linalg.norm(ref[i])), rtol=1e-5)
        g = grads[name]
        expected = float(jnp.sqrt(jnp.sum(g["w"] ** 2) + jnp.sum(g["b"] ** 2)))
        np.testing.assert_allclose(float(signals[name].param_grad_norm), expected, rtol=1e-5)
    ref_value, ref_grads = jax.value_and_grad(lambda p: _loss(p, x, jnp.tanh))(params)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    chex_leaves = zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads))
    for a, b in chex_leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vanishing_warning_fires_for_deep_sigmoid_and_not_for_residual_relu():
    width, depth = 16, 12
    params = _init(jax.random.key(2), depth, width)
    x = jax.random.normal(jax.random.key(3), (8, width))
    _, _, sig = backward_signals(lambda p, x: _loss(p, x, jax.nn.sigmoid))(params, x)
    warnings = signal_warnings(sig, vanish_ratio=1e-3)
    assert any("vanishes at layer 'layer_0'" in w for w in warnings), warnings

    def residual(p, x):
        h = x
        for i in range(depth):
            with jax.named_scope(f"layer_{i}"):
                h = h + 0.1 * jax.nn.relu(h @ p[f"layer_{i}"]["w"] + p[f"layer_{i}"]["b"][None, :])
        return jnp.sum(h ** 2)

    _, _, sig = backward_signals(residual)(params, x)
    assert signal_warnings(sig, vanish_ratio=1e-3) == []


def test_non_finite_signal_is_reported():
    assert "not finite" in signal_warnings({"a": float("nan"), "b": 1.0})[0]


def test_layer_and_its_last_sublayer_share_an_output():
    """``block/proj`` computes the output of ``block`` itself: both must report its signal."""
    def loss(p, x):
        with jax.named_scope("block"):
            with jax.named_scope("fc"):
                h = jnp.tanh(x @ p["block"]["fc"]["w"])
            with jax.named_scope("proj"):
                h = h @ p["block"]["proj"]["w"]
        return jnp.sum(jnp.sin(h))

    p = {"block": {"fc": {"w": jnp.full((3, 3), 0.5)}, "proj": {"w": jnp.full((3, 2), 0.3)}}}
    x = jnp.ones((2, 3))
    _, _, sig = backward_signals(loss)(p, x)
    assert float(sig["block"].activation_grad_norm) > 0
    np.testing.assert_allclose(float(sig["block"].activation_grad_norm),
                               float(sig["block/proj"].activation_grad_norm))


def test_layer_health_dead_units_activations_and_updates():
    from bpkit.diagnostics.health import health_warnings, layer_health, update_health
    w = jax.random.normal(jax.random.key(2), (3, 4))
    b = jnp.array([0.0, -100.0, 0.0, -100.0])              # units 1 and 3 never fire
    x = jax.random.normal(jax.random.key(3), (5, 3))

    def loss(p, x):
        with jax.named_scope("dense"):
            h = x @ p["dense"]["w"] + p["dense"]["b"][None, :]
        with jax.named_scope("relu"):
            a = jax.nn.relu(h)
        with jax.named_scope("head"):
            return jnp.sum((a @ p["head"]["w"]) ** 2)
    params = {"dense": {"w": w, "b": b}, "head": {"w": jnp.ones((4, 2))}}
    value, grads, health = jax.jit(layer_health(loss))(params, x)
    assert set(health) == {"dense", "relu", "head"}        # (jit returns dicts sorted)
    assert float(health["relu"].dead_fraction) == 0.5       # exactly the two dead units
    assert float(health["head"].dead_fraction) == 0.0       # δ W^T cotangents are not zero
    assert np.isnan(float(health["dense"].dead_fraction))   # its input is data: no cotangent
    h = x @ w + b[None, :]
    np.testing.assert_allclose(health["dense"].act_mean, jnp.mean(h), rtol=1e-6)
    np.testing.assert_allclose(health["relu"].act_std, jnp.std(jax.nn.relu(h)), rtol=1e-6)
    np.testing.assert_allclose(health["dense"].param_norm,
                               jnp.sqrt(jnp.sum(w ** 2) + jnp.sum(b ** 2)), rtol=1e-6)
    assert np.isnan(float(health["relu"].param_norm))
    np.testing.assert_allclose(grads["dense"]["w"], jax.grad(loss)(params, x)["dense"]["w"],
                               rtol=1e-6)
    updates = jax.tree_util.tree_map(lambda g: -1e-2 * g, grads)
    up = update_health(params, updates, list(health))
    assert set(up) == {"dense", "head"}
    np.testing.assert_allclose(up["head"]["update_ratio"],
                               jnp.linalg.norm(updates["head"]["w"]) / jnp.linalg.norm(
                                   params["head"]["w"]), rtol=1e-6)
    host = {"relu": {"dead_fraction": 0.5}, "dense": {"update_ratio": 0.5},
            "head": {"update_ratio": 1e-6}, "warm": {"update_ratio": 0.0}}
    msgs = health_warnings(host, dead_fraction=0.25, update_ratio_min=1e-4, update_ratio_max=0.1)
    assert len(msgs) == 3                                   # a zero update is not warned about
    assert "50% of the units entering layer 'relu' are dead" in msgs[0]
    assert "layer 'dense' moves fast" in msgs[1] and "layer 'head' barely moves" in msgs[2]

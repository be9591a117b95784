"""Whole programs written in plain JAX (no bpkit.nn): bpkit's gradient equals jax.grad's and
float64 finite differences (``bpkit.check_parity``), and jitted equals eager."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import bpkit
from bpkit.engine import registry


_RNG = np.random.default_rng(42)


def normal(shape, scale=0.5):
    """float64 normal draws, made by NumPy (no compile per shape while the module loads)."""
    return jnp.asarray(_RNG.standard_normal(shape) * scale)


# --- MLP with softmax cross-entropy -------------------------------------------------------------
def mlp(p, x, y):
    h = jax.nn.relu(x @ p["w1"] + p["b1"][None, :])
    h = jnp.tanh(h @ p["w2"] + p["b2"][None, :])
    logits = h @ p["w3"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


MLP_ARGS = ({"w1": normal((5, 8)), "b1": normal((8,), 0.1), "w2": normal((8, 8)),
             "b2": normal((8,), 0.1), "w3": normal((8, 4))},
            normal((6, 5), 1.0), jnp.array([0, 3, 1, 2, 3, 0]))


def ce_via_jax_nn(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype), -1))


def ce_via_optax(logits, labels):
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


CE_ARGS = (normal((5, 7), 2.0), jnp.array([0, 6, 3, 3, 1]))


# --- CNN: conv + max pooling + average pooling ------------------------------------------------
def cnn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    y = lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=dn)
    y = jax.nn.relu(y + p["b1"][None, None, None, :])
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    y = lax.conv_general_dilated(y, p["k2"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "VALID") / 4.0
    return jnp.sum(jnp.tanh(y.reshape(y.shape[0], -1) @ p["w"]) ** 2)


CNN_ARGS = ({"k1": normal((3, 3, 2, 4)), "b1": normal((4,), 0.1),
             "k2": normal((3, 3, 4, 3)), "w": normal((12, 2))},
            normal((2, 6, 6, 2), 1.0))


# --- recurrent nets through lax.scan ------------------------------------------------------------
def gru(p, xs):
    H = p["wh"].shape[0]

    def cell(h, x):  # h: (B, H), x: (B, D)
        gx, gh = x @ p["wx"], h @ p["wh"]
        z = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
        r = jax.nn.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
        n = jnp.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * n + z * h
        return h, h

    h, hs = lax.scan(cell, jnp.zeros((xs.shape[1], H)), xs)
    return jnp.mean(hs @ p["out"]) + jnp.sum(h ** 2)


GRU_ARGS = ({"wx": normal((3, 12)), "wh": normal((4, 12)), "out": normal((4, 2))},
            normal((6, 2, 3), 1.0))


def lstm(p, xs):
    H = p["wh"].shape[0]

    def cell(carry, x):
        h, c = carry
        g = x @ p["wx"] + h @ p["wh"] + p["b"][None, :]
        i, f, o = (jax.nn.sigmoid(g[:, k * H:(k + 1) * H]) for k in range(3))
        c = f * c + i * jnp.tanh(g[:, 3 * H:])
        h = o * jnp.tanh(c)
        return (h, c), h

    B = xs.shape[1]
    (h, c), hs = lax.scan(cell, (jnp.zeros((B, H)), jnp.zeros((B, H))), xs)
    return jnp.sum(hs[-1] * h) + jnp.mean(c)


LSTM_ARGS = ({"wx": normal((3, 16)), "wh": normal((4, 16)), "b": normal((16,), 0.1)},
             normal((5, 2, 3), 1.0))


# --- transformer pieces -----------------------------------------------------------------------------
def layer_norm(x, g, b, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * g + b


def layer_norm_loss(x, g, b):
    return jnp.sum(jnp.sin(layer_norm(x, g[None, :], b[None, :])))


LN_ARGS = (normal((4, 6), 1.0), 1 + normal((6,), 0.1), normal((6,), 0.1))


def causal_attention(p, x):  # x: (B, T, D)
    B, T, D = x.shape
    nh, hs = 2, D // 2
    qkv = x @ p["wqkv"]  # (B, T, 3D)
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
               for i in range(3))  # (B, nh, T, hs)
    att = (q @ k.transpose(0, 1, 3, 2)) / jnp.sqrt(jnp.float64(hs))  # (B, nh, T, T)
    mask = jnp.tril(jnp.ones((T, T), bool))
    att = jnp.where(mask[None, None], att, -jnp.inf)
    att = jax.nn.softmax(att, axis=-1)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
    y = layer_norm(x + y @ p["wo"], p["g"][None, None, :], p["b"][None, None, :])
    return jnp.sum(y ** 2) / (B * T)


ATTN_ARGS = ({"wqkv": normal((8, 24)), "wo": normal((8, 8)),
              "g": 1 + normal((8,), 0.1), "b": normal((8,), 0.1)},
             normal((2, 5, 8), 1.0))


def embedding(table, ids, w):
    e = table[ids]  # (B, T, D): ids repeat, so the cotangents must accumulate
    pos = jnp.take(table, jnp.array([2, 2, 2]), axis=0)
    return jnp.sum(jnp.tanh((e + pos[None]) @ w))


EMB_ARGS = (normal((10, 4)), jnp.array([[1, 3, 3], [0, 1, 3]]), normal((4, 3)))


def dropout_mlp(w, x, key):
    h = jnp.tanh(x @ w)
    keep = jax.random.bernoulli(key, 0.7, h.shape)
    h = jnp.where(keep, h / 0.7, 0.0)
    return jnp.sum(h ** 2)


DROP_ARGS = (normal((4, 6)), normal((3, 4), 1.0), jax.random.key(3))


PROGRAMS = {
    "mlp": (mlp, MLP_ARGS, 0, ()),
    "softmax_ce_jax_nn": (ce_via_jax_nn, CE_ARGS, 0, ()),
    "softmax_ce_optax": (ce_via_optax, CE_ARGS, 0, ()),
    "cnn_conv_pool": (cnn, CNN_ARGS, (0, 1), (lax.conv_general_dilated_p, lax.reduce_window_max_p,
                                                 lax.reduce_window_sum_p)),
    "gru_scan": (gru, GRU_ARGS, (0, 1), ()),
    "lstm_scan": (lstm, LSTM_ARGS, (0, 1), ()),
    "layer_norm": (layer_norm_loss, LN_ARGS, (0, 1, 2), ()),
    "causal_attention": (causal_attention, ATTN_ARGS, (0, 1), ()),
    "embedding_repeated_ids": (embedding, EMB_ARGS, (0, 2), (lax.gather_p,)),
    "dropout_with_key": (dropout_mlp, DROP_ARGS, (0, 1), ()),
}


def _skip_without_rules(needs):
    missing = [p.name for p in needs if not registry.has_rule(p)]
    if missing:
        pytest.skip(f"rule family not written yet: {missing}")


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_parity_float64(name):
    f, args, argnums, needs = PROGRAMS[name]
    _skip_without_rules(needs)
    # jit makes the finite-difference evaluations fast; bpkit differentiates through the jit.
    report = bpkit.check_parity(jax.jit(f), *args, argnums=argnums)
    assert report.ok, str(report)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_jit_equals_eager(name):
    f, args, argnums, needs = PROGRAMS[name]
    _skip_without_rules(needs)
    eager = bpkit.value_and_grad(f, argnums)(*args)
    jitted = jax.jit(bpkit.value_and_grad(f, argnums))(*args)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_embedding_repeated_ids_accumulate():
    table, ids, w = EMB_ARGS
    _skip_without_rules((lax.gather_p,))
    g = bpkit.grad(lambda t: jnp.sum(t[ids]))(table)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=10)
    np.testing.assert_array_equal(np.asarray(g), np.repeat(counts[:, None], 4, 1).astype(float))

"""``bpkit.per_example``: per-example gradient norms equal the norms of ``jax.vmap(jax.grad)``
over one-example batches (float64), per layer type, for the ghost forms (dense with and
without a sequence axis, both the pairwise and the direct product; convolutions; embeddings;
biases and norm scales; custom_vjp layer norm) and for the exact fallback (scan, tied
weights, a regularizer); DP-SGD's clipped gradient equals clipping vmap's gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpkit import models, nn
from bpkit.per_example import (
    PerExampleError,
    clipped_value_and_grad,
    per_example_grad_norms,
    plan_summary,
)

K = jax.random.split(jax.random.PRNGKey(0), 12)


def _normal(key, shape, scale=0.5):
    return jax.random.normal(key, shape, jnp.float64) * scale


def vmap_grads(loss, params, batch):
    """Each example's gradient: ``jax.grad`` of the loss on a one-example batch."""
    def one(p, ex):
        return loss(p, jax.tree_util.tree_map(lambda a: a[None], ex))
    return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))(params, batch)


def norms_of(grads):
    leaf = jax.tree_util.tree_map(
        lambda g: jnp.sqrt(jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=1)), grads)
    total = jnp.sqrt(sum(jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=1)
                         for g in jax.tree_util.tree_leaves(grads)))
    return total, leaf


def assert_matches_vmap(loss, params, batch, expect=None, **kw):
    got = jax.jit(per_example_grad_norms(loss, **kw))(params, batch)
    want_total, want_leaf = norms_of(vmap_grads(loss, params, batch))
    np.testing.assert_allclose(got.norms, want_total, rtol=1e-10)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                           got.leaf_norms, want_leaf)
    plan = plan_summary(loss)(params, batch)
    if expect is not None:
        for path, how in expect.items():
            assert plan[path].startswith(how), (path, plan[path])
    return plan


def ce(logits, y):
    return nn.losses.softmax_cross_entropy(logits, y)


def test_dense_and_biases_mlp():
    model = models.mlp(in_features=5, hidden=(7,), num_classes=3)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(K[0]))
    batch = {"x": _normal(K[1], (6, 5), 1.0), "y": jnp.array([0, 1, 2, 1, 0, 2])}
    loss = lambda p, b: jnp.mean(ce(model.apply(p, b["x"]), b["y"]))  # noqa: E731
    assert_matches_vmap(loss, params, batch, {"['dense_0']['w']": "ghost: dense",
                                              "['dense_0']['b']": "ghost: elementwise"})


@pytest.mark.parametrize("t,c,g", [(6, 3, 2), pytest.param(2, 5, 6, marks=pytest.mark.slow)],
                         ids=["pairwise", "direct"])
def test_dense_over_a_sequence(t, c, g):
    w, b = _normal(K[2], (c, g)), _normal(K[3], (g,))
    x = _normal(K[4], (4, t, c), 1.0)

    def loss(p, x):                                        # plain JAX, summed over the batch
        h = jnp.tanh(jnp.einsum("btc,cg->btg", x, p["w"]) + p["b"][None, None, :])
        return jnp.sum(h ** 2)
    assert_matches_vmap(loss, {"w": w, "b": b}, x, {"['w']": "ghost: dense",
                                                   "['b']": "ghost: elementwise"},
                        loss_reduction="sum")


@pytest.mark.slow
def test_weights_on_the_left_and_batch_not_first():
    w = _normal(K[2], (3, 4))
    x = _normal(K[4], (4, 5), 1.0)                          # examples on axis 1
    loss = lambda w, x: jnp.mean(jnp.sin(w @ x) ** 2) * 12  # noqa: E731  (mean over 5 examples)
    got = per_example_grad_norms(loss, batch_axis=1)(w, x)
    g = jax.vmap(jax.grad(lambda w, e: loss(w, e[:, None])), in_axes=(None, 1))(w, x)
    np.testing.assert_allclose(got.norms, norms_of(g)[0], rtol=1e-10)


def test_conv1d():
    def conv(x, k):
        return lax.conv_general_dilated(x, k, (2,), "SAME",
                                        dimension_numbers=("NWC", "WIO", "NWC"))

    def loss(p, x):                                        # x (B, 12, 1)
        h = jax.nn.relu(conv(x, p["k0"]) + p["b0"][None, None, :])   # 1 -> 16: patches
        return jnp.mean(jnp.sum(jnp.tanh(conv(h, p["k1"])) ** 2, axis=(1, 2)))  # 16 -> 8: Gram
    params = {"k0": _normal(K[5], (3, 1, 16)), "b0": _normal(K[6], (16,)),
              "k1": _normal(K[7], (3, 16, 8))}
    assert_matches_vmap(loss, params, _normal(K[8], (3, 12, 1), 1.0),
                        {"['k0']": "ghost: conv", "['k1']": "ghost: conv",
                         "['b0']": "ghost: elementwise"})


@pytest.mark.slow
def test_conv2d_strided_channels_first():
    k2 = _normal(K[7], (2, 3, 2, 3))
    x = _normal(K[8], (3, 2, 5, 4), 1.0)

    def loss(k, x):
        y = lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=("NCHW", "HWIO",
                                                                              "NHWC"))
        return jnp.mean(jnp.sum(jnp.tanh(y), axis=(1, 2, 3)))
    assert_matches_vmap(loss, k2, x, {"": "ghost: conv"})


def test_embedding_with_repeated_tokens():
    table, w = _normal(K[9], (7, 3)), _normal(K[10], (3, 2))

    def loss(p, t):                                        # t (B, T) int
        e = jnp.take(p["table"], t, axis=0)                # (B, T, 3)
        return jnp.mean(jnp.sum(jnp.tanh(e @ p["w"]) ** 2, axis=(1, 2)))
    tokens = jnp.array([[1, 3, 3, 1, 0], [2, 2, 2, 2, 2], [6, 5, 4, 3, 2]])
    assert_matches_vmap(loss, {"table": table, "w": w}, tokens,
                        {"['table']": "ghost: embed", "['w']": "ghost: dense"})


@pytest.mark.slow
def test_gpt_every_leaf_ghost():
    model = models.gpt(vocab_size=7, d_model=8, n_layers=1, n_heads=2, context=6)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(K[9]))
    tokens = jnp.array([[1, 3, 3, 1, 0], [2, 2, 2, 2, 2], [6, 5, 4, 3, 2]])
    loss = lambda p, t: jnp.mean(ce(model.apply(p, t), t))  # noqa: E731
    plan = assert_matches_vmap(loss, params, tokens,
                               {"['tok_emb']['table']": "ghost: embed",
                                "['pos_emb']['table']": "ghost: elementwise",
                                "['block_0']['ln_1']['scale']": "ghost: elementwise",
                                "['block_0']['attn']['qkv']['w']": "ghost: dense"})
    assert all(v.startswith("ghost") for v in plan.values()), plan   # fused ops seen through


def test_rms_norm_scale_and_sum_reduction():
    norm = nn.rms_norm()
    scale = _normal(K[10], (4,)) + 1
    x = _normal(K[11], (5, 3, 4), 1.0)
    loss = lambda s, x: jnp.sum(norm.apply({"scale": s}, x) ** 3)  # noqa: E731
    assert_matches_vmap(loss, scale, x, {"": "ghost: elementwise"}, loss_reduction="sum")


def test_fallbacks_are_exact_for_their_leaves_only():
    w, v = _normal(K[0], (3, 3)), _normal(K[1], (3, 2))

    def loss(p, xs):                                       # xs (B, T, 3)
        h, _ = lax.scan(lambda h, x: (jnp.tanh(x + h @ p["w"]), None),
                        jnp.zeros(xs.shape[::2], xs.dtype), jnp.swapaxes(xs, 0, 1))
        out = h @ p["v"]                                   # after the scan: ghost
        tied = jnp.sum((h @ p["w"]) * h)                   # w used twice: exact
        return jnp.mean(jnp.sum(out ** 2, axis=1)) + tied / xs.shape[0] + 0.1 * jnp.sum(
            p["v"] ** 2)                                   # regularizer on v: exact
    plan = assert_matches_vmap(loss, {"w": w, "v": v}, _normal(K[2], (4, 5, 3), 1.0))
    assert plan["['w']"].startswith("exact") and plan["['v']"].startswith("exact")

    def loss_gru_head(p, xs):
        h, _ = lax.scan(lambda h, x: (jnp.tanh(x + h @ p["w"]), None),
                        jnp.zeros(xs.shape[::2], xs.dtype), jnp.swapaxes(xs, 0, 1))
        return jnp.mean(jnp.sum((h @ p["v"]) ** 2, axis=1))
    plan = assert_matches_vmap(loss_gru_head, {"w": w, "v": v}, _normal(K[2], (4, 5, 3), 1.0))
    assert plan == {"['v']": "ghost: dense", "['w']": plan["['w']"]}
    assert "scan" in plan["['w']"]


@pytest.mark.slow
def test_batch_axis_per_argument_and_under_jit():
    w = _normal(K[3], (4, 2))
    x = _normal(K[4], (6, 4), 1.0)
    key = jax.random.PRNGKey(3)

    def loss(w, x, key):
        noise = jax.random.normal(key, (2,), x.dtype) * 0.0
        return jnp.mean(jnp.sum(jnp.tanh(x @ w + noise[None, :]) ** 2, axis=1))
    got = jax.jit(per_example_grad_norms(loss, batch_axis=(None, 0, None)))(w, x, key)
    want = norms_of(jax.vmap(jax.grad(lambda w, e: loss(w, e[None], key)), in_axes=(None, 0))(w, x))
    np.testing.assert_allclose(got.norms, want[0], rtol=1e-10)


def test_batch_statistics_are_refused():
    def loss(p, x):
        h = x @ p
        h = h - jnp.mean(h, axis=0, keepdims=True)         # a statistic over the examples
        return jnp.mean(h ** 2)
    with pytest.raises(PerExampleError, match="examples interact at 'sub'"):
        per_example_grad_norms(loss)(_normal(K[5], (3, 2)), _normal(K[6], (4, 3)))


def _dp_check(loss, params, batch, n):
    per = vmap_grads(lambda p, b: loss(p, b)[0], params, batch)
    total, _ = norms_of(per)
    clip = float(jnp.median(total))
    (value, aux), grad, norms = jax.jit(clipped_value_and_grad(loss, clip, has_aux=True))(
        params, batch)
    np.testing.assert_allclose(norms, total, rtol=1e-10)
    factors = jnp.minimum(1.0, clip / total)
    assert 0 < int(jnp.sum(factors < 1)) < n                 # some clipped, some not
    want = jax.tree_util.tree_map(lambda g: jnp.tensordot(factors, g, 1) / n, per)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-15),
                           grad, want)
    np.testing.assert_allclose(value, loss(params, batch)[0])
    return aux


def test_dp_clipped_gradient_equals_clipping_vmap_gradients():
    model = models.mlp(in_features=5, hidden=(7,), num_classes=3)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(K[0]))
    batch = {"x": _normal(K[1], (6, 5), 1.0),
             "y": jnp.array([0, 1, 2, 1, 0, 2])}

    def loss(p, b):
        return jnp.mean(ce(model.apply(p, b["x"]), b["y"])), {"n": jnp.sum(b["y"])}
    assert int(_dp_check(loss, params, batch, 6)["n"]) == 6


@pytest.mark.slow
def test_dp_clipped_gradient_gpt():
    model = models.gpt(vocab_size=7, d_model=8, n_layers=1, n_heads=2, context=6)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(K[7]))
    tokens = jnp.array([[1, 3, 3, 1], [2, 2, 2, 2], [6, 5, 4, 3]])

    def loss(p, t):
        return jnp.mean(ce(model.apply(p, t), t)), {}
    _dp_check(loss, params, tokens, 3)

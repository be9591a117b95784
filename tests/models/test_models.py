"""Every reference model: output shape and dtype, jit == eager, parity on a small float64
instance (bpkit vs jax.grad vs finite differences), readable parameter paths; GPT causality
and sampling; fused == unfused GPT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpkit
from bpkit import models, nn
from bpkit.nn import losses
from bpkit.testing import assert_parity


def _x(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _tokens(shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


GEN, DISC = models.gan_2d(latent_dim=3, hidden=8)
# (id, small model, input maker(dtype), output shape, some expected param paths)
CASES = [
    ("logreg", models.logreg(in_features=6, num_classes=3), lambda d: _x((2, 6), d), (2, 3),
     ["linear/w", "linear/b"]),
    ("mlp", models.mlp(in_features=6, hidden=(5, 4), num_classes=3), lambda d: _x((2, 6), d),
     (2, 3), ["dense_0/w", "dense_1/b", "head/w"]),
    ("mlp_gelu", models.mlp(in_features=6, hidden=(5,), num_classes=3, activation="gelu"),
     lambda d: _x((2, 6), d), (2, 3), ["dense_0/w", "head/w"]),
    ("cnn1d", models.cnn1d(in_length=12, channels=(3, 4), kernel_size=3, num_classes=3),
     lambda d: _x((2, 12), d), (2, 3), ["conv_0/w", "conv_1/b", "head/w"]),
    ("cnn2d", models.cnn2d(in_shape=(8, 8, 1), channels=(2, 3), num_classes=3),
     lambda d: _x((2, 8, 8, 1), d), (2, 3), ["conv_0/w", "conv_1/w", "head/w"]),
    ("cnn2d_flat_input", models.cnn2d(in_shape=(4, 4, 2), channels=(2,), num_classes=3),
     lambda d: _x((2, 32), d), (2, 3), ["conv_0/w", "head/w"]),
    ("gru_classifier", models.gru_classifier(hidden=4, num_classes=3), lambda d: _x((2, 5), d),
     (2, 3), ["gru/w_x", "gru/w_h", "gru/b", "head/w"]),
    ("lstm_classifier", models.lstm_classifier(in_features=2, hidden=4, num_classes=3),
     lambda d: _x((2, 5, 2), d), (2, 3), ["lstm/w_x", "lstm/w_h", "head/w"]),
    ("gpt", models.gpt(vocab_size=7, d_model=8, n_layers=1, n_heads=2, context=6),
     lambda d: _tokens((2, 5), 7), (2, 5, 7),
     ["tok_emb/table", "pos_emb/table", "block_0/attn/qkv/w", "block_0/mlp/fc/w",
      "block_0/ln_2/scale", "ln_f/bias", "head/w"]),
    ("residual_mlp", models.residual_mlp(in_features=6, width=5, depth=3, num_classes=3),
     lambda d: _x((2, 6), d), (2, 3), ["stem/w", "block_2/body/dense/w", "head/w"]),
    ("sigmoid_mlp", models.sigmoid_mlp(in_features=6, width=5, depth=3, num_classes=3),
     lambda d: _x((2, 6), d), (2, 3), ["dense_0/w", "dense_2/w", "head/b"]),
    ("regression_mlp", models.regression_mlp(hidden=(5, 5)), lambda d: _x((3,), d), (3, 1),
     ["dense_0/w", "dense_1/w", "head/w"]),
    ("gan_generator", GEN, lambda d: _x((4, 3), d), (4, 2), ["dense_0/w", "out/w"]),
    ("gan_discriminator", DISC, lambda d: _x((4, 2), d), (4,), ["dense_1/w", "out/b"]),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_dtype_paths_and_jit(case):
    _, model, make_x, out_shape, paths = case
    params = model.init(jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert set(paths) <= set(nn.param_paths(params))
    x = make_x(jnp.float32)
    y = model.apply(params, x)
    assert y.shape == out_shape and y.dtype == jnp.float32
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity(case):
    _, model, make_x, out_shape, _ = case
    params = nn.cast(model.init(jax.random.key(0)), jnp.float64)
    x = make_x(jnp.float64)
    w = _x(out_shape, jnp.float64, seed=1)
    assert_parity(lambda p: jnp.sum(model.apply(p, x) * w), params, directions=1)


def test_gpt_fused_equals_unfused_with_dropout():
    """Fused ops (attention, layer norm, cross-entropy) against the unfused references in a
    whole GPT loss with dropout: values and gradients (jax.grad and bpkit.grad)."""
    kw = dict(vocab_size=7, d_model=8, n_layers=1, n_heads=2, context=6, dropout=0.1)
    fused, unfused = models.gpt(**kw), models.gpt(**kw, fused=False)
    params = nn.cast(fused.init(jax.random.key(0)), jnp.float64)
    tokens, targets = _tokens((2, 6), 7), _tokens((2, 6), 7, seed=1)
    key = jax.random.key(5)

    def loss(model, fused_loss):
        def f(params):
            logits = model.apply(params, tokens, key=key, train=True)
            return jnp.mean(losses.softmax_cross_entropy(logits, targets, fused=fused_loss))
        return f

    f, r = loss(fused, True), loss(unfused, False)
    v_f, g_f = jax.jit(jax.value_and_grad(f))(params)
    v_r, g_r = jax.jit(jax.value_and_grad(r))(params)
    np.testing.assert_allclose(v_f, v_r, rtol=1e-12)
    for g in (g_f, jax.jit(bpkit.grad(f))(params)):
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_r)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_gpt_causality():
    model = models.gpt(vocab_size=7, d_model=8, n_layers=2, n_heads=2, context=6)
    params = model.init(jax.random.key(0))
    tokens = _tokens((1, 6), 7)
    changed = tokens.at[0, 4].set((tokens[0, 4] + 1) % 7)
    a, b = model.apply(params, tokens), model.apply(params, changed)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_generate():
    model = models.gpt(vocab_size=7, d_model=8, n_layers=1, n_heads=2, context=4)
    params = model.init(jax.random.key(0))
    prompt = jnp.array([[1, 2, 3], [3, 4, 5]], jnp.int32)
    sample = jax.jit(lambda key: models.generate(model, params, key, prompt, 3, 1.0))
    out = sample(jax.random.key(1))
    assert out.shape == (2, 6) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 7
    np.testing.assert_array_equal(out, sample(jax.random.key(1)))  # deterministic per key
    # greedy decoding agrees with running the model token by token (the window slides at 5)
    greedy = models.generate(model, params, jax.random.key(1), prompt, 3, temperature=0.0)
    seq = prompt
    apply = jax.jit(model.apply)
    for _ in range(3):
        logits = apply(params, seq[:, -4:])
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]], 1)
    np.testing.assert_array_equal(greedy, seq)
    assert models.generate(model, params, jax.random.key(1), prompt[0], 1).shape == (4,)


def test_dropout_models_are_deterministic_under_a_key():
    model = models.gpt(vocab_size=7, d_model=8, n_layers=1, n_heads=2, context=6, dropout=0.5)
    params = model.init(jax.random.key(0))
    tokens = _tokens((2, 6), 7)
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(params, tokens, key=jax.random.key(1), train=True)
    b = apply(params, tokens, key=jax.random.key(1), train=True)
    c = apply(params, tokens, key=jax.random.key(2), train=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(apply(params, tokens), apply(params, tokens, train=False))


def test_sigmoid_mlp_gradients_vanish_with_depth_residual_do_not():
    x = _x((16, 40))
    y = jnp.asarray(np.random.default_rng(0).integers(0, 10, 16), jnp.int32)

    def first_layer_grad_norm(model, first):
        params = model.init(jax.random.key(0))
        g = jax.jit(jax.grad(lambda p: jnp.mean(
            losses.softmax_cross_entropy(model.apply(p, x), y))))(params)
        return float(jnp.linalg.norm(g[first]["w"]))

    sig = first_layer_grad_norm(models.sigmoid_mlp(depth=20), "dense_0")
    res = first_layer_grad_norm(models.residual_mlp(depth=20), "stem")
    assert sig < 1e-3 * res


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="choose one of"):
        models.mlp(activation="swish!")


def test_stateful_cnn1d_with_batch_norm():
    """``cnn1d(batch_norm=True)``: a stateful Model (init_state; apply takes and returns the
    running statistics), bias-free convolutions, parity in train and eval mode, jit == eager."""
    model = models.cnn1d(in_length=12, channels=(3, 4), kernel_size=3, num_classes=3,
                         batch_norm=True)
    assert model.stateful and not models.cnn1d(in_length=12).stateful
    params, state = model.init(jax.random.key(0)), model.init_state()
    assert {"conv_0/w", "bn_0/scale", "bn_1/bias", "head/w"} <= set(nn.param_paths(params))
    assert "conv_0/b" not in nn.param_paths(params)  # the normalisation would cancel it
    assert set(nn.param_paths(state)) == {"bn_0/mean", "bn_0/var", "bn_1/mean", "bn_1/var"}
    x = _x((5, 12))
    y, new_state = model.apply(params, x, train=True, state=state)
    assert y.shape == (5, 3) and y.dtype == jnp.float32
    assert not np.allclose(new_state["bn_0"]["mean"], state["bn_0"]["mean"])
    y_eval, same_state = model.apply(params, x, state=new_state)  # eval: running statistics
    for a, b in zip(jax.tree_util.tree_leaves(same_state), jax.tree_util.tree_leaves(new_state)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(y_eval, y)  # batch statistics in training, running ones in eval
    jitted = jax.jit(lambda p, x, s: model.apply(p, x, train=True, state=s))(params, x, state)
    np.testing.assert_allclose(jitted[0], y, rtol=1e-5, atol=1e-5)
    params64, state64 = nn.cast(params, jnp.float64), nn.cast(new_state, jnp.float64)
    x64, w = _x((5, 12), jnp.float64), _x((5, 3), jnp.float64, seed=1)
    for train in (True, False):
        assert_parity(lambda p: jnp.sum(model.apply(p, x64, train=train, state=state64)[0] * w),
                      params64, directions=1)

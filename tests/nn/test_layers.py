"""Every layer: output shape and dtype, jit == eager, parity (bpkit vs jax.grad vs finite
differences, float64), readable parameter paths, shape errors naming the layer."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpkit import nn
from tests.nn.util import check_parity_of, f64, random_input

B = 2
# (id, layer, per-example input shape, expected per-example output shape, expected param paths)
CASES = [
    ("dense", nn.dense(3), (4,), (3,), ["b", "w"]),
    ("dense_seq", nn.dense(3, in_features=4), (2, 4), (2, 3), ["b", "w"]),
    ("conv1d", nn.conv1d(3, 3), (7, 2), (7, 3), ["b", "w"]),
    ("conv1d_strided_dilated", nn.conv1d(3, 3, stride=2, dilation=2, padding="VALID"), (9, 2),
     (3, 3), ["b", "w"]),
    ("conv1d_groups", nn.conv1d(4, 3, groups=2, padding=1), (6, 4), (6, 4), ["b", "w"]),
    ("conv2d", nn.conv2d(3, (2, 3)), (5, 5, 2), (5, 5, 3), ["b", "w"]),
    ("conv2d_strided", nn.conv2d(2, 3, stride=2, padding=1, dilation=1), (6, 6, 2), (3, 3, 2),
     ["b", "w"]),
    ("conv2d_groups_dilated", nn.conv2d(4, 2, groups=2, dilation=2, padding="VALID"),
     (5, 5, 2), (3, 3, 4), ["b", "w"]),
    ("max_pool1d", nn.max_pool1d(2), (6, 3), (3, 3), []),
    ("avg_pool1d", nn.avg_pool1d(3, stride=1, padding="SAME"), (5, 2), (5, 2), []),
    ("max_pool2d", nn.max_pool2d(2), (4, 6, 2), (2, 3, 2), []),
    ("avg_pool2d", nn.avg_pool2d((2, 3), stride=1), (4, 5, 2), (3, 3, 2), []),
    ("global_avg_pool", nn.global_avg_pool(), (4, 3, 2), (2,), []),
    ("flatten", nn.flatten(), (3, 2, 2), (12,), []),
    ("relu", nn.relu(), (5,), (5,), []),
    ("leaky_relu", nn.leaky_relu(0.1), (5,), (5,), []),
    ("elu", nn.elu(), (5,), (5,), []),
    ("gelu_tanh", nn.gelu(), (5,), (5,), []),
    ("gelu_exact", nn.gelu(approximate=False), (5,), (5,), []),
    ("silu", nn.silu(), (5,), (5,), []),
    ("tanh", nn.tanh(), (5,), (5,), []),
    ("sigmoid", nn.sigmoid(), (5,), (5,), []),
    ("softplus", nn.softplus(), (5,), (5,), []),
    ("dropout_eval", nn.dropout(0.5), (5,), (5,), []),
    ("layer_norm", nn.layer_norm(), (3, 4), (3, 4), ["bias", "scale"]),
    ("layer_norm_unfused", nn.layer_norm(fused=False), (3, 4), (3, 4), ["bias", "scale"]),
    ("rms_norm", nn.rms_norm(), (3, 4), (3, 4), ["scale"]),
    ("pos_embedding", nn.positional_embedding(6), (4, 3), (4, 3), ["table"]),
    ("attn", nn.self_attention(2), (4, 6), (4, 6), ["proj/b", "proj/w", "qkv/b", "qkv/w"]),
    ("attn_causal_unfused", nn.self_attention(2, causal=True, fused=False), (4, 6), (4, 6),
     ["proj/b", "proj/w", "qkv/b", "qkv/w"]),
    ("transformer_block", nn.transformer_block(2, mlp_ratio=2), (3, 4), (3, 4),
     ["attn/proj/b", "attn/proj/w", "attn/qkv/b", "attn/qkv/w", "ln_1/bias", "ln_1/scale",
      "ln_2/bias", "ln_2/scale", "mlp/fc/b", "mlp/fc/w", "mlp/proj/b", "mlp/proj/w"]),
    ("rnn", nn.rnn(3), (4, 2), (4, 3), ["b", "w_h", "w_x"]),
    ("gru", nn.gru(3), (4, 2), (4, 3), ["b", "w_h", "w_x"]),
    ("lstm", nn.lstm(3), (4, 2), (4, 3), ["b", "w_h", "w_x"]),
    ("lstm_last", nn.lstm(3, return_sequences=False), (4, 2), (3,), ["b", "w_h", "w_x"]),
    ("sequential", nn.sequential(nn.dense(4), nn.tanh(), nn.dense(2)), (3,), (2,),
     ["dense_0/b", "dense_0/w", "dense_1/b", "dense_1/w"]),
    ("residual", nn.residual(nn.sequential(nn.dense(3), nn.silu(), name="body")), (3,), (3,),
     ["body/dense/b", "body/dense/w"]),
    ("parallel", nn.parallel(nn.dense(2, name="a"), nn.dense(3, name="b")), (4,), (5,),
     ["a/b", "a/w", "b/b", "b/w"]),
]
IDS = [c[0] for c in CASES]


def _setup(case, dtype=jnp.float64):
    name, layer, in_shape, _, _ = case
    params, out_shape = layer.init(jax.random.key(0), in_shape)
    params = nn.cast(params, dtype)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = random_input(rng, (B,) + in_shape, dtype)
    return layer, params, x, out_shape


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_shape_dtype_and_paths(case):
    _, layer, in_shape, expected_out, expected_paths = case
    params, out_shape = layer.init(jax.random.key(0), in_shape)
    assert out_shape == expected_out
    assert sorted(nn.param_paths(params)) == expected_paths
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    for dtype in (jnp.float32, jnp.float64):
        layer, p, x, _ = _setup(case, dtype)
        y = layer.apply(p, x)
        assert y.shape == (B,) + expected_out and y.dtype == dtype


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_matches_eager(case):
    layer, params, x, _ = _setup(case, jnp.float32)
    eager = layer.apply(params, x)
    jitted = jax.jit(layer.apply)(params, x)
    np.testing.assert_allclose(eager, jitted, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parity(case):
    layer, params, x, _ = _setup(case, jnp.float64)
    check_parity_of(layer.apply, params, x)


def test_embedding():
    layer = nn.embedding(7, 3)
    params, out_shape = layer.init(jax.random.key(0), (4,))
    assert out_shape == (4, 3) and nn.param_paths(params) == ["table"]
    tokens = jnp.array([[0, 6, 2, 2], [1, 1, 5, 3]], jnp.int32)
    y = layer.apply(params, tokens)
    assert y.shape == (2, 4, 3) and y.dtype == jnp.float32
    np.testing.assert_array_equal(y[1, 2], params["table"][5])
    np.testing.assert_array_equal(jax.jit(layer.apply)(params, tokens), y)
    check_parity_of(layer.apply, f64(params), tokens)


def test_dropout_determinism_and_eval_identity():
    layer = nn.dropout(0.5)
    x = jnp.ones((4, 100), jnp.float32)
    k = jax.random.key(3)
    a = layer.apply({}, x, key=k, train=True)
    b = layer.apply({}, x, key=k, train=True)
    c = layer.apply({}, x, key=jax.random.key(4), train=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(np.asarray(a))) <= {0.0, 2.0}  # inverted dropout: kept values x/(1-p)
    np.testing.assert_array_equal(layer.apply({}, x, key=k, train=False), x)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        layer.apply({}, x, train=True)


def test_dropout_parity_under_fixed_key():
    layer = nn.sequential(nn.dense(4), nn.dropout(0.5))
    params = f64(layer.init(jax.random.key(0), (3,))[0])
    x = random_input(np.random.default_rng(0), (2, 3))
    check_parity_of(lambda p, x: layer.apply(p, x, key=jax.random.key(1), train=True), params, x)


def test_batch_norm_state_updates_and_eval_mode():
    layer = nn.batch_norm(momentum=0.5)
    params, _ = layer.init(jax.random.key(0), (3,))
    state = layer.init_state((3,))
    x = 2.0 + 3.0 * random_input(np.random.default_rng(0), (64, 3), jnp.float32)
    y, new_state = layer.apply(params, x, state=state, train=True)
    np.testing.assert_allclose(jnp.mean(y, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.std(y, 0), 1.0, atol=1e-3)
    np.testing.assert_allclose(new_state["mean"], 0.5 * jnp.mean(x, 0), rtol=1e-5)
    np.testing.assert_allclose(new_state["var"], 0.5 + 0.5 * jnp.var(x, 0), rtol=1e-5)
    y_eval, same = layer.apply(params, x, state=new_state, train=False)
    assert same is new_state
    expected = (x - new_state["mean"][None]) / jnp.sqrt(new_state["var"][None] + 1e-5)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-5)
    jy, js = jax.jit(lambda p, x, s: layer.apply(p, x, state=s, train=True))(params, x, state)
    np.testing.assert_allclose(jy, y, rtol=1e-5, atol=1e-6)
    for train in (True, False):
        check_parity_of(lambda p, x: layer.apply(p, x, state=f64(state), train=train)[0],
                        f64(params), jnp.asarray(x[:5], jnp.float64))


def test_stateful_sequential_threads_state():
    net = nn.sequential(nn.dense(4), nn.batch_norm(), nn.relu(), nn.dense(2))
    assert net.stateful
    params, _ = net.init(jax.random.key(0), (3,))
    state = net.init_state((3,))
    assert list(state) == ["batch_norm"] and state["batch_norm"]["mean"].shape == (4,)
    y, new_state = net.apply(params, jnp.ones((5, 3), jnp.float32), state=state, train=True)
    assert y.shape == (5, 2)
    assert not np.array_equal(new_state["batch_norm"]["mean"], state["batch_norm"]["mean"])


@pytest.mark.parametrize("fused", [True, False])
def test_attention_causality(fused):
    layer = nn.self_attention(2, causal=True, fused=fused)
    params, _ = layer.init(jax.random.key(0), (6, 4))
    x = random_input(np.random.default_rng(0), (1, 6, 4), jnp.float32)
    y = layer.apply(params, x)
    x2 = x.at[:, 4].set(100.0)  # change a future token
    y2 = layer.apply(params, x2)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_named_scopes_carry_layer_names():
    net = nn.sequential(nn.dense(4, name="enc"), nn.relu(), nn.dense(2, name="dec"))
    params, _ = net.init(jax.random.key(0), (3,))
    jaxpr = jax.make_jaxpr(net.apply)(params, jnp.ones((1, 3), jnp.float32))
    stacks = {str(e.source_info.name_stack) for e in jaxpr.jaxpr.eqns}
    assert any("sequential/enc" in s for s in stacks) and any("sequential/dec" in s for s in stacks)


@pytest.mark.parametrize("make,in_shape,match", [
    (lambda: nn.dense(3, in_features=5), (4,), r"dense: declared in_features=5 .* 4 features"),
    (lambda: nn.conv2d(3, 3), (5, 5), r"conv2d: expects per-example inputs \(H, W, C\)"),
    (lambda: nn.conv1d(4, 3, groups=3), (6, 4), r"conv1d: groups=3 must divide"),
    (lambda: nn.conv1d(4, 5, padding="VALID"), (3, 1), r"conv1d: kernel .* larger"),
    (lambda: nn.self_attention(3), (4, 8), r"attn: model width 8 is not divisible"),
    (lambda: nn.residual(nn.dense(2)), (3,), r"residual: the residual body 'dense' maps"),
    (lambda: nn.parallel(nn.dense(2), nn.flatten()), (3, 4), r"parallel: branch output shapes"),
    (lambda: nn.sequential(nn.dense(2), nn.conv1d(2, 3)), (3,), r"conv1d: expects"),
])
def test_shape_errors_name_the_layer(make, in_shape, match):
    with pytest.raises(nn.ShapeError, match=match):
        make().init(jax.random.key(0), in_shape)


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="choose one of"):
        nn.activation("swishy")

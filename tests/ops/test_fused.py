"""Fused ops == unfused references (values and gradients, several shapes, float32 and float64),
parity of bpkit's engine (which runs the hand-written backward) against jax.grad and float64
finite differences, and the memory claim of the attention backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpkit
from bpkit import ops
from bpkit.ops import reference
from bpkit.testing import assert_parity

TOL = {"float32": dict(rtol=2e-5, atol=2e-5), "float64": dict(rtol=1e-11, atol=1e-12)}


def _normal(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _xent_args(shape, dtype, seed=0):
    logits = 3.0 * _normal(seed, shape, dtype)
    labels = jnp.asarray(np.random.default_rng(seed + 1).integers(0, shape[-1], shape[:-1]),
                         jnp.int32)
    return (logits, labels)


def _ln_args(shape, dtype, seed=0):
    return (2.0 + 3.0 * _normal(seed, shape, dtype), _normal(seed + 1, shape[-1:], dtype),
            _normal(seed + 2, shape[-1:], dtype))


def _attn_args(shape, dtype, seed=0):
    b, t, h, d = shape
    return tuple(_normal(seed + i, shape, dtype) for i in range(3))


def _conv_args(kernel, out_channels=3):
    """``(x, w)`` for an x of the given shape and a ``kernel + (C, out_channels)`` kernel."""
    def make(shape, dtype, seed=0):
        return (_normal(seed, shape, dtype),
                _normal(seed + 1, tuple(kernel) + (shape[-1], out_channels), dtype) / 2)
    return make


# (id, fused, reference, args maker, shapes, differentiated argnums)
OPS = [
    ("xent", ops.softmax_cross_entropy, reference.softmax_cross_entropy, _xent_args,
     [(5, 7), (2, 3, 11), (1, 2)], (0,)),
    ("xent_smooth", lambda z, y: ops.softmax_cross_entropy(z, y, 0.1),
     lambda z, y: reference.softmax_cross_entropy(z, y, 0.1), _xent_args, [(5, 7), (2, 3, 4)],
     (0,)),
    ("layer_norm", ops.layer_norm, reference.layer_norm, _ln_args,
     [(5, 8), (2, 3, 6), (1, 1)], (0, 1, 2)),
    ("attention", ops.attention, reference.attention, _attn_args,
     [(2, 5, 3, 4), (1, 1, 1, 8)], (0, 1, 2)),
    ("attention_causal", lambda q, k, v: ops.attention(q, k, v, causal=True),
     lambda q, k, v: reference.attention(q, k, v, causal=True), _attn_args,
     # 64 and 128 rows: 2 and 4 query blocks (causal tiling); how a length splits into blocks
     # (3 for 96, one for a prime 131) is test_causal_attention_query_blocks's
     [(2, 5, 3, 4), (1, 1, 1, 8), (1, 64, 2, 4), (1, 128, 2, 4)], (0, 1, 2)),
    ("conv", ops.conv, reference.conv, _conv_args((3, 3)), [(2, 6, 5, 1), (1, 4, 4, 3)], (0, 1)),
    ("conv_1d", ops.conv, reference.conv, _conv_args((5,)), [(2, 9, 1), (3, 7, 2)], (0, 1)),
    ("conv_strided_dilated", lambda x, w: ops.conv(x, w, strides=(2, 1), dilation=(1, 2)),
     lambda x, w: reference.conv(x, w, strides=(2, 1), dilation=(1, 2)), _conv_args((3, 2)),
     [(2, 7, 8, 2)], (0, 1)),
    ("conv_explicit_padding", lambda x, w: ops.conv(x, w, padding=((2, 0), (-1, 1))),
     lambda x, w: reference.conv(x, w, padding=((2, 0), (-1, 1))), _conv_args((3, 3)),
     [(1, 5, 6, 2)], (0, 1)),
    ("conv_3d_valid", lambda x, w: ops.conv(x, w, padding="VALID"),
     lambda x, w: reference.conv(x, w, padding="VALID"), _conv_args((2, 2, 2)),
     [(1, 4, 5, 4, 1)], (0, 1)),
]
PARAMS = [pytest.param(fused, ref, make, shape, argnums, dtype, id=f"{name}-{shape}-{dtype}")
          for name, fused, ref, make, shapes, argnums in OPS for shape in shapes
          for dtype in ("float32", "float64")]


def _loss(fn, out_shape, dtype):
    w = _normal(99, out_shape, dtype)
    return lambda *a: jnp.sum(jnp.sin(fn(*a)) * w)


@pytest.mark.parametrize("fused,ref,make,shape,argnums,dtype", PARAMS)
def test_fused_equals_reference(fused, ref, make, shape, argnums, dtype):
    args = make(shape, dtype)
    out = fused(*args)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(out, ref(*args), **TOL[dtype])
    f, r = _loss(fused, out.shape, dtype), _loss(ref, out.shape, dtype)
    g_ref = jax.jit(jax.grad(r, argnums))(*args)
    # jax.grad and bpkit's engine both run the custom_vjp's hand-written backward.
    for grad in (jax.grad, bpkit.grad):
        for g_f, g_r in zip(jax.jit(grad(f, argnums))(*args), g_ref):
            assert g_f.dtype == jnp.dtype(dtype)
            np.testing.assert_allclose(g_f, g_r, **TOL[dtype])


@pytest.mark.parametrize("name,fused,ref,make,shapes,argnums", OPS, ids=[o[0] for o in OPS])
def test_parity_float64(name, fused, ref, make, shapes, argnums):
    args = make(shapes[0], "float64")
    out = jax.eval_shape(fused, *args)
    assert_parity(_loss(fused, out.shape, "float64"), *args, argnums=argnums)


def test_causal_attention_query_blocks():
    """Up to 4 equal query blocks of >= 32 rows when causal; one block otherwise."""
    from bpkit.ops.attention import query_blocks
    assert query_blocks(64, True) == [(0, 32), (32, 64)]
    assert query_blocks(96, True) == [(0, 32), (32, 64), (64, 96)]
    assert query_blocks(128, True) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert query_blocks(1024, True) == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    assert query_blocks(131, True) == [(0, 131)]  # 131 is prime: no equal blocks
    assert query_blocks(100, True) == [(0, 50), (50, 100)]  # 3 does not divide 100
    assert query_blocks(31, True) == [(0, 31)]
    assert query_blocks(256, False) == [(0, 256)]


def test_tiled_causal_attention_parity_float64():
    """The tiled path (4 query blocks) against jax.grad and float64 finite differences."""
    args = _attn_args((1, 128, 2, 4), "float64")
    assert_parity(_loss(lambda q, k, v: ops.attention(q, k, v, causal=True), (1, 128, 2, 4),
                        "float64"), *args, argnums=(0, 1, 2))


def test_attention_matches_jax_dot_product_attention():
    q, k, v = _attn_args((2, 6, 2, 4), "float32")
    for causal in (False, True):
        np.testing.assert_allclose(ops.attention(q, k, v, causal=causal),
                                   jax.nn.dot_product_attention(q, k, v, is_causal=causal),
                                   rtol=1e-5, atol=1e-6)


def test_attention_cross_lengths():
    q = _normal(0, (1, 3, 2, 4), "float64")
    k, v = _normal(1, (1, 5, 2, 4), "float64"), _normal(2, (1, 5, 2, 4), "float64")
    np.testing.assert_allclose(ops.attention(q, k, v), reference.attention(q, k, v), rtol=1e-12)
    assert_parity(_loss(ops.attention, (1, 3, 2, 4), "float64"), q, k, v, argnums=(0, 1, 2))
    with pytest.raises(ValueError, match="causal=True needs as many queries as keys"):
        ops.attention(q, k, v, causal=True)


def test_attention_saves_no_probability_matrix():
    """The residuals of the fused forward are O(T) per head; none is a (T, T) matrix."""
    from bpkit.ops.attention import attention_forward
    for t in (16, 128):  # one query block, four
        q, k, v = _attn_args((1, t, 2, 4), "float32")
        _, saved = attention_forward(q, k, v, True)
        assert not any(s.shape[-2:] == (t, t) for s in saved)
        assert saved[-1].shape == (1, 2, t, 1)  # lse: one number per row


def test_layer_norm_saves_mean_and_rstd():
    from bpkit.ops.layer_norm import layer_norm_forward
    x, s, b = _ln_args((3, 5), "float32")
    _, (x_saved, s_saved, mean, rstd) = layer_norm_forward(x, s, b, 1e-5)
    assert mean.shape == rstd.shape == (3, 1)


def test_layer_norm_backward_products_use_highest_precision():
    """dscale and the row projection are matrix-vector products; on GPU/TPU a default-precision
    float32 product rounds its inputs (tf32/bf16), which the CPU tests cannot see."""
    from bpkit.ops.layer_norm import layer_norm_backward, layer_norm_forward
    x, s, b = _ln_args((3, 5), "float32")
    jaxpr = jax.make_jaxpr(lambda x, s, b, g: layer_norm_backward(
        1e-5, layer_norm_forward(x, s, b, 1e-5)[1], g))(x, s, b, x)
    precisions = [e.params["precision"] for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(precisions) == 2
    assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in precisions)


@pytest.mark.parametrize("name", [o[0] for o in OPS if o[0].startswith("conv")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_forward_rule_equals_the_convolution(name, dtype):
    """Under differentiation the op's value comes from its forward rule (the shifted
    multiply-adds), not from the primal convolution: both must equal the reference."""
    _, fused, ref, make, shapes, _ = next(o for o in OPS if o[0] == name)
    forward = jax.jit(lambda *a: jax.vjp(fused, *a)[0])
    loss = jax.jit(lambda *a: bpkit.value_and_grad(lambda *b: jnp.sum(fused(*b) ** 2),
                                                    (0, 1))(*a)[0])
    for shape in shapes:
        args = make(shape, dtype)
        np.testing.assert_allclose(forward(*args), ref(*args), **TOL[dtype])
        np.testing.assert_allclose(loss(*args), jnp.sum(ref(*args) ** 2), **TOL[dtype])


def test_conv_forward_rule_is_shifted_products_and_saves_its_inputs():
    from bpkit.ops.conv import conv_forward
    x, w = _conv_args((3, 3))((2, 6, 5, 2), "float32")
    jaxpr = jax.make_jaxpr(lambda x, w: conv_forward(x, w, (1, 1), ((1, 1), (1, 1)),
                                                     (1, 1)))(x, w)
    names = [e.primitive.name for e in jaxpr.eqns]
    assert "conv_general_dilated" not in names
    assert names.count("mul") == 3 * 3 * 2  # one multiply per tap (offset, input channel)
    _, saved = conv_forward(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))
    assert saved[0] is x and saved[1] is w


def test_conv_layers_train_few_taps_with_the_shifted_op_on_cpu():
    """nn.conv2d routes a kernel of <= 27 taps (3x3 x 3 channels) through ops.conv on CPU; 72
    taps, groups > 1 and fused=False stay plain convolutions."""
    from bpkit import nn

    def custom_calls(layer, in_shape):
        params, _ = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), in_shape))
        x = jax.ShapeDtypeStruct((2,) + in_shape, jnp.float32)
        jaxpr = jax.make_jaxpr(layer.apply)(params, x)
        return sum(e.primitive.name.startswith("custom_vjp") for e in jaxpr.eqns)

    on_cpu = jax.default_backend() == "cpu"
    assert custom_calls(nn.conv2d(4, 3), (6, 6, 3)) == on_cpu
    assert custom_calls(nn.conv1d(4, 5), (9, 1)) == on_cpu
    assert custom_calls(nn.conv2d(4, 3), (6, 6, 8)) == 0  # 72 taps
    assert custom_calls(nn.conv2d(4, 3, groups=2), (6, 6, 2)) == 0
    assert custom_calls(nn.conv2d(4, 3, fused=False), (6, 6, 3)) == 0


def test_cross_entropy_saves_probabilities_not_logits():
    """The backward reads softmax(z) back instead of recomputing exp; the logits are not kept."""
    from bpkit.ops.cross_entropy import softmax_cross_entropy_forward
    z = _normal(0, (3, 5), "float64")
    labels = jnp.asarray([0, 4, 2], jnp.int32)
    _, (probs, saved_labels) = softmax_cross_entropy_forward(z, labels, 0.0)
    np.testing.assert_allclose(probs, jax.nn.softmax(z), rtol=1e-12)
    np.testing.assert_array_equal(saved_labels, labels)


@pytest.mark.parametrize("bad", [
    lambda: ops.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((4,), jnp.int32)),
    lambda: ops.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((3,))),
    lambda: ops.layer_norm(jnp.zeros((3, 4)), jnp.ones((3,)), jnp.zeros((4,))),
    lambda: ops.attention(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3))),
    lambda: ops.conv(jnp.zeros((1, 5, 2)), jnp.zeros((3, 3, 4))),  # C = 2 vs the kernel's 3
    lambda: ops.conv(jnp.zeros((1, 5, 2)), jnp.zeros((3, 2, 4), jnp.float16)),
])
def test_errors(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()

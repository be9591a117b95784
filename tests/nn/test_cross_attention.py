"""Cross-attention and the encoder-decoder's decoder block: shapes and parameter paths,
parity (bpkit vs jax.grad vs float64 finite differences, w.r.t. parameters, queries and
memory), fused == unfused, causality of the decoder, and clear errors. The unfused path's
parity: its parts' (tests/nn/test_layers.py, tests/ops)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpkit import nn
from bpkit.testing import assert_parity
from tests.nn.util import f64, random_input, weights_like

B, TQ, TK, D = 2, 3, 5, 4  # Tq != Tk: cross-attention allows it


def _setup(layer, seed=0):
    params, out_shape = layer.init(jax.random.key(0), (TQ, D))
    rng = np.random.default_rng(seed)
    return f64(params), out_shape, random_input(rng, (B, TQ, D)), random_input(rng, (B, TK, D))


@pytest.mark.parametrize("make,paths", [
    (lambda: nn.cross_attention(2),
     ["kv/b", "kv/w", "proj/b", "proj/w", "q/b", "q/w"]),
    # The decoder block's parity inside a whole model: the reverse_transformer config's
    # train-step parity (tests/apps/test_configs_learn.py).
    pytest.param(lambda: nn.decoder_block(2, mlp_ratio=2),
     ["cross_attn/kv/b", "cross_attn/kv/w", "cross_attn/proj/b", "cross_attn/proj/w",
      "cross_attn/q/b", "cross_attn/q/w", "ln_1/bias", "ln_1/scale", "ln_2/bias", "ln_2/scale",
      "ln_3/bias", "ln_3/scale", "mlp/fc/b", "mlp/fc/w", "mlp/proj/b", "mlp/proj/w",
      "self_attn/proj/b", "self_attn/proj/w", "self_attn/qkv/b", "self_attn/qkv/w"],
     marks=pytest.mark.slow),
], ids=["cross_attention", "decoder_block"])
def test_paths_shapes_and_parity(make, paths):
    layer = make()
    params, out_shape, x, memory = _setup(layer)
    assert out_shape == (TQ, D) and sorted(nn.param_paths(params)) == paths
    w = weights_like((B, TQ, D))

    def loss(params, x, memory):
        return jnp.sum(layer.apply(params, x, memory=memory) * w)
    assert_parity(loss, params, x, memory, argnums=(0, 1, 2), directions=1)


def _jitted(layer):
    return jax.jit(lambda params, x, memory: layer.apply(params, x, memory=memory))


def test_fused_equals_unfused():
    params, _, x, memory = _setup(nn.cross_attention(2))
    fused = _jitted(nn.cross_attention(2))(params, x, memory)
    unfused = _jitted(nn.cross_attention(2, fused=False))(params, x, memory)
    np.testing.assert_allclose(fused, unfused, rtol=1e-12, atol=1e-12)


def test_every_query_sees_all_of_memory_and_the_decoder_is_causal():
    block = nn.decoder_block(2, mlp_ratio=2)
    params, _, x, memory = _setup(block)
    run = _jitted(block)
    y = run(params, x, memory)
    moved = run(params, x, memory.at[:, -1].add(3.0))  # the last memory position
    assert np.all(np.abs(np.asarray(moved - y)).max(axis=-1) > 1e-6)  # every query changes
    later = run(params, x.at[:, -1].add(3.0), memory)  # the last target position
    np.testing.assert_array_equal(later[:, :-1], y[:, :-1])


def test_memory_errors_are_clear():
    layer = nn.cross_attention(2)
    params, _, x, memory = _setup(layer)
    with pytest.raises(ValueError, match=r"cross_attn: pass memory=\(B, Tk, d\)"):
        layer.apply(params, x)
    with pytest.raises(ValueError, match=r"cross_attn: pass memory"):
        layer.apply(params, x, memory=memory[..., :2])
    with pytest.raises(nn.ShapeError, match="cross_attn: model width 6 is not divisible"):
        nn.cross_attention(4).init(jax.random.key(0), (3, 6))

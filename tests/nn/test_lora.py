"""nn.lora: parity (bpkit vs jax.grad vs float64 finite differences) with non-zero adapters,
the adapter's zero start, the merge for inference, and split/join."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpkit import models, nn
from tests.nn.util import check_parity_of, f64, random_input


def _with_random_adapters(params, seed=0):
    """``params`` with every ``lora_b`` drawn at random (it starts at zero, where the gradient
    w.r.t. ``lora_a`` vanishes and parity would check little)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
        if nn.core.path_str(p).endswith("lora_b") else x, params)


def test_lora_dense_parity():
    layer = nn.lora(nn.dense(5), rank=2, alpha=4.0)
    params, out_shape = layer.init(jax.random.key(0), (3, 4))
    assert out_shape == (3, 5)
    assert sorted(nn.param_paths(params)) == ["b", "lora_a", "lora_b", "w"]
    assert params["lora_a"].shape == (4, 2) and params["lora_b"].shape == (2, 5)
    params = f64(_with_random_adapters(params))
    x = random_input(np.random.default_rng(1), (2, 3, 4))
    check_parity_of(layer.apply, params, x)
    low_rank = (x @ params["lora_a"]) @ params["lora_b"]  # (B, T, 5); scale alpha/r = 2
    want = x @ params["w"] + params["b"][None, None] + 2.0 * low_rank
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-12)


def test_lora_starts_as_the_wrapped_layer():
    plain, _ = nn.dense(5).init(jax.random.key(3), (4,))
    adapted, _ = nn.lora(nn.dense(5), rank=2).init(jax.random.key(3), (4,))
    np.testing.assert_array_equal(adapted["w"], plain["w"])  # the same key, the same base
    np.testing.assert_array_equal(adapted["lora_b"], 0.0)
    assert np.std(np.asarray(adapted["lora_a"])) > 0.1
    x = random_input(np.random.default_rng(0), (2, 4), jnp.float32)
    np.testing.assert_array_equal(nn.lora(nn.dense(5), rank=2).apply(adapted, x),
                                  nn.dense(5).apply(plain, x))


def test_merge_equals_the_unmerged_forward():
    kw = dict(vocab_size=11, d_model=8, n_layers=1, n_heads=2, context=6)
    adapted = models.gpt(**kw, lora_rank=2, lora_alpha=3.0)
    params = _with_random_adapters(jax.jit(adapted.init)(jax.random.PRNGKey(0)))
    assert len([p for p in nn.param_paths(params) if "lora_" in p]) == 8  # 4 projections
    plain = models.gpt(**kw)
    base, adapters = nn.lora_split(params)
    assert jax.tree_util.tree_structure(base) == \
        jax.tree_util.tree_structure(jax.eval_shape(plain.init, jax.random.PRNGKey(0)))
    assert all("lora_" in p for p in nn.param_paths(adapters))
    assert nn.param_paths(nn.lora_join(base, adapters)) == nn.param_paths(params)
    merged = nn.lora_merge(params, 3.0)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 6)), jnp.int32)
    want = jax.jit(adapted.apply)(params, tokens)
    plain_apply = jax.jit(plain.apply)
    assert not np.allclose(want, plain_apply(base, tokens), atol=1e-3)  # the adapters act
    np.testing.assert_allclose(plain_apply(merged, tokens), want, rtol=1e-4, atol=1e-5)


def test_lora_refuses_what_it_cannot_adapt():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        nn.lora(nn.dense(3), rank=0)
    with pytest.raises(nn.ShapeError, match="lora adapts dense layers"):
        nn.lora(nn.layer_norm(), rank=2).init(jax.random.key(0), (3, 4))

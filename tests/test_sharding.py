"""Sharded training on simulated devices matches one device; clean SPMD programs; clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpkit
from bpkit import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; "
                                "run with XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _init(key):
    k1, k2 = jax.random.split(key)
    return {"dense_0": {"w": jax.random.normal(k1, (16, 32), jnp.float32) * 0.3,
                        "b": jnp.zeros(32, jnp.float32)},
            "head": {"w": jax.random.normal(k2, (32, 8), jnp.float32) * 0.3,
                     "b": jnp.zeros(8, jnp.float32)}}


def _loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["dense_0"]["w"] + params["dense_0"]["b"][None, :])
    logits = h @ params["head"]["w"] + params["head"]["b"][None, :]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _train(mesh, steps=6):
    opt = optax.adam(1e-2)
    params = _init(jax.random.key(0))
    opt_state = opt.init(params)
    if mesh is not None:
        params, opt_state = sharding.shard_state(params, mesh), sharding.shard_state(opt_state, mesh)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = bpkit.value_and_grad(_loss)(params, batch)
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
            updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = (jnp.asarray(rng.standard_normal((64, 16)), jnp.float32),
                 jnp.asarray(rng.integers(0, 8, 64), jnp.int32))
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh)
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return np.array(losses), step, params, opt_state, batch


@pytest.mark.parametrize("data,fsdp", [(2, 1), (4, 1), (8, 1), (2, 4)])
def test_sharded_losses_match_one_device(data, fsdp):
    reference, *_ = _train(None)
    losses, *_ = _train(sharding.make_mesh(data, fsdp))
    np.testing.assert_allclose(losses, reference, rtol=2e-5)


def test_data_parallel_program_all_reduces_and_never_gathers():
    mesh = sharding.make_mesh(8)
    _, step, params, opt_state, batch = _train(mesh, steps=1)
    hlo = step.lower(params, opt_state, batch).compile().as_text()
    assert "all-reduce" in hlo
    assert "all-gather" not in hlo


def test_fsdp_shards_parameters_and_optimizer_state():
    mesh = sharding.make_mesh(2, 4)
    _, _, params, opt_state, _ = _train(mesh, steps=1)
    w = params["dense_0"]["w"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert len({str(s.index) for s in w.addressable_shards}) == 4
    mu = opt_state[0].mu["dense_0"]["w"]
    assert mu.sharding.spec == w.sharding.spec


def test_clear_errors():
    with pytest.raises(sharding.ShardingError, match="asks for 16 devices"):
        sharding.make_mesh(16)
    with pytest.raises(sharding.ShardingError, match="not divisible by the 8 devices"):
        sharding.shard_batch(jnp.zeros((12, 3)), sharding.make_mesh(8))

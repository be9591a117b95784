"""Pure train steps: engines agree, one trace, donation, freezing, accumulation, GAN, bf16."""
import dataclasses
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpkit import models, nn
from bpkit.config import OptimizerConfig
from bpkit.data import load_mnist1d, train_batch
from bpkit.engine import compat
from bpkit.nn import losses
from bpkit.train import (TrainState, build_optimizer, default_decay_mask, make_eval_step,
                         make_gan_step, make_train_step)
from bpkit.train.optim import OPTIMIZERS, frozen_mask, param_paths


@pytest.fixture(scope="module")
def data():
    return load_mnist1d()


MODEL = models.mlp(hidden=(16,), activation="tanh")


def loss_fn(params, batch, key):
    logits = MODEL.apply(params, batch["x"], key=key, train=True)        # (B, 10)
    loss = jnp.mean(losses.softmax_cross_entropy(logits, batch["y"]))
    return loss, {"accuracy": losses.accuracy(logits, batch["y"])}


def fresh_state(tx, seed=0):
    return TrainState.create(MODEL.init(jax.random.PRNGKey(seed)), tx, seed=seed)


def run(engine, data, steps=20, cfg=OptimizerConfig(name="adamw", weight_decay=0.01,
                                                      schedule="cosine", warmup_steps=3)):
    tx, schedule = build_optimizer(cfg, steps)
    step = make_train_step(loss_fn, tx, engine=engine, has_aux=True, schedule=schedule)
    state, out = fresh_state(tx), []
    for i in range(steps):
        state, m = step(state, train_batch(data, i, 32, 0))
        out.append({k: float(v) for k, v in m.items()})
    return state, out


def test_bpkit_and_jax_engines_give_the_same_losses(data):
    _, a = run("bpkit", data)
    _, b = run("jax", data)
    for ma, mb in zip(a, b):
        assert set(ma) == {"loss", "accuracy", "grad_norm", "update_norm", "learning_rate"}
        for k in ma:
            np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert a[-1]["loss"] < a[0]["loss"]
    assert a[0]["learning_rate"] == 0.0 and a[3]["learning_rate"] == pytest.approx(1e-3)


def test_step_traces_once_and_donates_the_state(data):
    traces = []

    def counted(params, batch, key):
        traces.append(1)
        return loss_fn(params, batch, key)

    tx = optax.sgd(0.1)
    step = make_train_step(counted, tx, has_aux=True)
    state = fresh_state(tx)
    old = state
    for i in range(4):
        state, _ = step(state, train_batch(data, i, 32, 0))
    assert len(traces) == 1
    assert jax.tree_util.tree_leaves(old.params)[0].is_deleted()
    assert int(state.step) == 4


def test_unjitted_step_matches_jitted(data):
    tx = optax.sgd(0.1)
    batch = train_batch(data, 0, 32, 0)
    s1, m1 = make_train_step(loss_fn, tx, has_aux=True, jit=False)(fresh_state(tx), batch)
    s2, m2 = make_train_step(loss_fn, tx, has_aux=True)(fresh_state(tx), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _called_bodies(hlo: str, call: str) -> list[str]:
    """The bodies of the computations that ``call`` (a regex ending in a computation name
    group) names in the HLO text."""
    bodies = {m.group(1): m.group(0) for m in re.finditer(r"^%(\S+) \(.*?^}", hlo, re.S | re.M)}
    return [bodies[name] for name in re.findall(call, hlo)]


def test_steps_compile_with_the_xla_options_measured_faster_on_this_jax():
    """On CPU, bpkit's steps compile without copies of loop carries (region analysis) and, on
    JAX 0.10 and 0.12, with XLA's own convolutions rather than YNNPACK's
    (compat.step_compiler_options).
    The options must compile on the installed jaxlib, give the same numbers, and
    ``compiler_options=None`` must give XLA's defaults back."""
    model = nn.sequential(nn.conv2d(32, 3), nn.flatten(), nn.dense(4), name="net")
    cell = nn.gru(4, return_sequences=False)
    params = {"conv": model.init(jax.random.PRNGKey(0), (8, 8, 4))[0],
              "rnn": cell.init(jax.random.PRNGKey(1), (3, 4))[0]}
    batch = {"x": jnp.ones((2, 8, 8, 4), jnp.float32)}

    def loss(p, b, key):
        features = model.apply(p["conv"], b["x"])                        # (2, 4)
        h = cell.apply(p["rnn"], jnp.stack([features] * 3, axis=1))      # (2, 4)
        return jnp.mean(h ** 2)

    tx = optax.sgd(0.1)

    def program(**options):
        step = make_train_step(loss, tx, donate=False, **options)
        state = TrainState.create(params, tx)
        return step.lower(state, batch).compile().as_text(), step(state, batch)[1]["loss"]

    def ynn_convolutions(hlo):
        return sum("convolution(" in body for body in
                   _called_bodies(hlo, r"calls=%([\w.\-]+)[^\n]*__ynn_fusion"))

    def carry_copies(hlo):
        return sum(len(re.findall(r"= \S+ copy\(", body)) for body in
                   _called_bodies(hlo, r"while\([^\n]*body=%([\w.\-]+)"))

    auto, auto_loss = program()
    default, default_loss = program(compiler_options=None)
    assert ynn_convolutions(default) > 0 and carry_copies(default) > 0, (
        "XLA's defaults changed: re-measure compat.step_compiler_options")
    assert carry_copies(auto) == 0
    assert (ynn_convolutions(auto) > 0) == compat.YNNPACK_CONVOLUTIONS_ON_CPU
    np.testing.assert_allclose(float(auto_loss), float(default_loss), rtol=1e-6)


def test_building_steps_leaves_jax_backends_unstarted():
    """The steps choose their compiler options on first use: building one must not start JAX's
    backends, which jax.distributed.initialize and bpkit.reuse_host_memory must precede."""
    code = ("import jax.numpy as jnp, optax\n"
            "from bpkit.engine import compat\n"
            "from bpkit.train import make_eval_step, make_gan_step, make_train_step\n"
            "loss = lambda p, b, k: jnp.sum(p * b)\n"
            "make_train_step(loss, optax.sgd(0.1)); make_eval_step(lambda p, b: {'x': p})\n"
            "make_gan_step(loss, loss, optax.sgd(0.1), optax.sgd(0.1))\n"
            "print(compat.backends_are_initialized())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False"]


def test_frozen_paths_do_not_move(data):
    cfg = OptimizerConfig(name="adam", learning_rate=1e-2, trainable=["head/*"])
    tx, _ = build_optimizer(cfg, 5)
    state = fresh_state(tx)
    before = jax.tree_util.tree_map(np.array, state.params)
    step = make_train_step(loss_fn, tx, has_aux=True)
    for i in range(3):
        state, _ = step(state, train_batch(data, i, 32, 0))
    assert np.array_equal(state.params["dense_0"]["w"], before["dense_0"]["w"])
    assert not np.array_equal(state.params["head"]["w"], before["head"]["w"])
    mask = frozen_mask(before, freeze=["*/b"])
    assert mask["head"]["b"] and not mask["head"]["w"]


def test_gradient_accumulation_equals_the_big_batch(data):
    big = train_batch(data, 0, 64, 0)
    halves = [jax.tree_util.tree_map(lambda x: x[:32], big),
              jax.tree_util.tree_map(lambda x: x[32:], big)]
    cfg = OptimizerConfig(name="sgd", learning_rate=0.5)
    tx_acc, _ = build_optimizer(dataclasses.replace(cfg, accumulate_steps=2), 1)
    tx, _ = build_optimizer(cfg, 1)
    state = fresh_state(tx_acc)
    step = make_train_step(loss_fn, tx_acc, has_aux=True)
    p0 = jax.tree_util.tree_map(np.array, state.params)
    state, _ = step(state, halves[0])
    assert np.array_equal(state.params["head"]["w"], p0["head"]["w"])  # not applied yet
    state, _ = step(state, halves[1])
    ref, _ = make_train_step(loss_fn, tx, has_aux=True)(fresh_state(tx), big)
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_takes_a_step(name, data):
    cfg = OptimizerConfig(name=name, learning_rate=1e-2, weight_decay=1e-3, clip_norm=1.0)
    _, out = run("bpkit", data, steps=3, cfg=cfg)
    assert all(np.isfinite(m["loss"]) for m in out)
    assert out[-1]["update_norm"] > 0


@pytest.mark.parametrize("schedule, checks", [
    ("constant", {0: 1.0, 50: 1.0}),
    ("linear", {10: 1.0, 100: 0.0}),
    ("cosine", {0: 0.0, 10: 1.0, 100: 0.0}),
    ("exponential", {10: 1.0, 60: 0.5}),
    ("piecewise", {0: 1.0, 30: 0.1, 80: 0.01}),
])
def test_schedules(schedule, checks):
    cfg = OptimizerConfig(learning_rate=1.0, schedule=schedule,
                          warmup_steps=0 if schedule in ("constant", "piecewise") else 10,
                          transition_steps=50, boundaries=[20, 70], scales=[0.1, 0.1])
    _, sched = build_optimizer(cfg, 100)
    for step, value in checks.items():
        assert float(sched(step)) == pytest.approx(value, abs=1e-6), (schedule, step)


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"dense": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)},
              "ln": {"scale": jnp.ones(3), "bias": jnp.ones(3)}, "emb": {"table": jnp.ones((4, 2))}}
    mask = default_decay_mask(params)
    assert mask == {"dense": {"w": True, "b": False}, "ln": {"scale": False, "bias": False},
                    "emb": {"table": True}}
    assert param_paths(params) == ["dense/b", "dense/w", "emb/table", "ln/bias", "ln/scale"]


def test_nonfinite_updates_can_be_skipped(data):
    def nan_loss(params, batch, key):
        loss, aux = loss_fn(params, batch, key)
        return loss * jnp.asarray(jnp.nan, loss.dtype), aux

    tx = optax.adam(1e-2)
    state = fresh_state(tx)
    before = jax.tree_util.tree_map(np.array, state.params)
    state, m = make_train_step(nan_loss, tx, has_aux=True, skip_nonfinite=True)(
        state, train_batch(data, 0, 32, 0))
    assert int(m["skipped"]) == 1 and int(state.step) == 1
    assert np.array_equal(state.params["head"]["w"], before["head"]["w"])


def test_bf16_compute_keeps_float32_master_params(data):
    tx = optax.sgd(0.1)
    step = make_train_step(loss_fn, tx, has_aux=True, compute_dtype=jnp.bfloat16)
    state, m = step(fresh_state(tx), train_batch(data, 0, 32, 0))
    assert m["loss"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    _, ref = make_train_step(loss_fn, tx, has_aux=True)(fresh_state(tx),
                                                        train_batch(data, 0, 32, 0))
    assert float(m["loss"]) == pytest.approx(float(ref["loss"]), rel=2e-2)


def test_gan_step_updates_both_networks():
    gen, disc = models.gan_2d(latent_dim=2, hidden=16)
    bce = losses.binary_cross_entropy_with_logits

    def d_loss(d, g, batch, key):
        fake = jax.lax.stop_gradient(gen.apply(g, jax.random.normal(key, (8, 2), jnp.float32)))
        real, gen_logits = disc.apply(d, batch["x"]), disc.apply(d, fake)
        return jnp.mean(bce(real, jnp.ones_like(real)) + bce(gen_logits, jnp.zeros_like(real)))

    def g_loss(g, d, batch, key):
        logits = disc.apply(d, gen.apply(g, jax.random.normal(key, (8, 2), jnp.float32)))
        return jnp.mean(bce(logits, jnp.ones_like(logits)))

    tx_d, tx_g = optax.adam(1e-2), optax.adam(1e-2)
    kg, kd = jax.random.split(jax.random.PRNGKey(0))
    params = {"generator": gen.init(kg), "discriminator": disc.init(kd)}
    before = jax.tree_util.tree_map(np.array, params)
    state = TrainState(jnp.zeros((), jnp.int32), params,
                       {"generator": tx_g.init(params["generator"]),
                        "discriminator": tx_d.init(params["discriminator"])}, {},
                       jax.random.PRNGKey(1))
    step = make_gan_step(d_loss, g_loss, tx_d, tx_g)
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), jnp.float32)}
    state, m = step(state, batch)
    assert {"loss", "d_loss", "g_loss", "grad_norm", "update_norm"} <= set(m)
    for net in ("generator", "discriminator"):
        assert not np.array_equal(state.params[net]["out"]["w"], before[net]["out"]["w"])


def test_eval_step_masks_padding(data):
    def metric_fn(params, batch):
        logits = MODEL.apply(params, batch["x"])
        return {"loss": losses.softmax_cross_entropy(logits, batch["y"])}

    params = MODEL.init(jax.random.PRNGKey(0))
    ev = make_eval_step(metric_fn)
    full = ev(params, {"x": data.x_test[:6], "y": data.y_test[:6]})
    padded = ev(params, {"x": np.concatenate([data.x_test[:6], data.x_test[:2]]),
                         "y": np.concatenate([data.y_test[:6], data.y_test[:2]]),
                         "mask": np.array([1] * 6 + [0] * 2, np.float32)})
    assert float(padded["count"]) == 6
    np.testing.assert_allclose(float(padded["loss"]), float(full["loss"]), rtol=1e-6)


BN_NET = nn.sequential(nn.dense(16), nn.batch_norm(momentum=0.5), nn.relu(), nn.dense(10))


def bn_loss_fn(params, batch, key, model_state):
    logits, new_state = BN_NET.apply(params, batch["x"], key=key, train=True, state=model_state)
    return jnp.mean(losses.softmax_cross_entropy(logits, batch["y"])), ({}, new_state)


@pytest.mark.parametrize("engine", ["bpkit", "jax"])
def test_stateful_model_updates_its_running_statistics(engine, data):
    """has_state=True threads BatchNorm statistics through the step; engines agree."""
    tx = optax.sgd(0.1)
    params, _ = BN_NET.init(jax.random.PRNGKey(0), (40,))
    state = TrainState.create(params, tx, model_state=BN_NET.init_state((40,)))
    step = make_train_step(bn_loss_fn, tx, engine=engine, has_state=True, donate=False)
    batch = train_batch(data, 0, 32, 0)
    new, m = step(state, batch)
    # the running mean moved halfway (momentum 0.5) to the batch mean of the first dense layer
    h = BN_NET.apply(params, batch["x"], state=state.model_state, train=True)[1]
    np.testing.assert_allclose(new.model_state["batch_norm"]["mean"], h["batch_norm"]["mean"],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(new.model_state["batch_norm"]["mean"], 0.0)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: bn_loss_fn(p, batch, None, state.model_state)[0])(params)
    np.testing.assert_allclose(float(m["loss"]), float(ref_loss), rtol=1e-6)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, ref_grads)
    leaves = jax.tree_util.tree_leaves
    for got, want in zip(leaves(new.params), leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_stateful_step_keeps_state_on_a_skipped_step(data):
    def nan_loss(params, batch, key, model_state):
        loss, aux = bn_loss_fn(params, batch, key, model_state)
        return loss * jnp.nan, aux

    tx = optax.sgd(0.1)
    params, _ = BN_NET.init(jax.random.PRNGKey(0), (40,))
    state = TrainState.create(params, tx, model_state=BN_NET.init_state((40,)))
    new, m = make_train_step(nan_loss, tx, has_state=True, skip_nonfinite=True)(
        state, train_batch(data, 0, 32, 0))
    assert int(m["skipped"]) == 1
    np.testing.assert_array_equal(new.model_state["batch_norm"]["mean"], 0.0)


@pytest.mark.parametrize("bad_aux, message", [
    (lambda s: s, "must return \\(loss, \\(metrics, new_model_state\\)\\)"),
    (lambda s: ({}, {"other": s}), "different structure"),
])
def test_stateful_loss_with_wrong_outputs_is_explained(bad_aux, message, data):
    def bad(params, batch, key, model_state):
        loss, (_, new_state) = bn_loss_fn(params, batch, key, model_state)
        return loss, bad_aux(new_state)

    tx = optax.sgd(0.1)
    params, _ = BN_NET.init(jax.random.PRNGKey(0), (40,))
    state = TrainState.create(params, tx, model_state=BN_NET.init_state((40,)))
    with pytest.raises((TypeError, ValueError), match=message):
        make_train_step(bad, tx, has_state=True)(state, train_batch(data, 0, 32, 0))

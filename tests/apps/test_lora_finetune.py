"""Fine-tuning for the forgetting study (configs/charlm_{finetune,lora,l2_pull}.yaml): a LoRA
run loads a plain model's checkpoint under its adapters, trains only the adapters (the base
parameters stay bit-for-bit those loaded) and its loss falls; the prose corpus shares the
source corpus's vocabulary; the L2 pull adds strength * (params - params_0) to the gradient.
The configs' parity through ``bpkit parity``: tests/train/test_parity_configs.py."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpkit import nn
from bpkit.config import load_config
from bpkit.data import train_batch
from bpkit.data.text import default_corpus
from bpkit.train import checkpoint as ckpt
from bpkit.train import loop
from bpkit.train.optim import pull_toward_start
from bpkit.train.step import to_host
from tests.numerics import user_numerics
from tests.train.helpers import CONFIGS

TINY = ["data.context=8", "data.max_chars=20000", "model.args.d_model=16",
        "model.args.n_layers=1", "model.args.n_heads=2", "data.batch_size=16"]


@pytest.fixture(autouse=True)
def training_numerics():
    with user_numerics():  # as users run training (see tests/numerics.py)
        yield


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_lora_trains_only_the_adapters_and_learns(tmp_path):
    pre_cfg = load_config(os.path.join(CONFIGS, "charlm_gpt.yaml"), TINY)
    _, pre_task, pre_tx, _ = loop.build(pre_cfg)
    pre = loop.init_state(pre_cfg, pre_task, pre_tx)  # a "pre-trained" plain model
    ranges = loop.leaf_ranges(pre)
    ckpt.save(str(tmp_path / "pre" / "checkpoints"), 1, pre,
              extra={k: ranges[k] for k in ("params_leaves", "model_state_leaves")})

    cfg = load_config(os.path.join(CONFIGS, "charlm_lora.yaml"),
                      TINY + [f"model.init_from={tmp_path / 'pre'}", "run.steps=40",
                              "optimizer.learning_rate=0.01"])
    ds, task, tx, schedule = loop.build(cfg)
    assert ds.name == "python-docs" and ds.vocab == "".join(sorted(set(default_corpus(20000))))
    state = loop.init_state(cfg, task, tx)
    base, adapters = (_leaves(t) for t in nn.lora_split(state.params))  # the step donates
    for got, want in zip(base, _leaves(pre.params)):
        np.testing.assert_array_equal(got, want)
    report = loop.check_step_parity(task, state.params, train_batch(ds, 0, 2, cfg.run.seed),
                                    jax.random.PRNGKey(0), fd=False)
    assert report.ok, str(report)
    step_fn, _ = loop.make_steps(cfg, task, tx, schedule)
    losses = []
    for step in range(cfg.run.steps):
        state, metrics = step_fn(state, train_batch(ds, step, cfg.data.batch_size, cfg.run.seed))
        losses.append(to_host(metrics)["loss"])
    new_base, new_adapters = nn.lora_split(state.params)
    for got, want in zip(_leaves(new_base), _leaves(pre.params)):
        np.testing.assert_array_equal(got, want)  # frozen: bit for bit
    assert all(not np.array_equal(a, b)
               for a, b in zip(_leaves(new_adapters), adapters))
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5])


def test_l2_pull_adds_the_gradient_of_the_penalty():
    p0 = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    tx = optax.chain(pull_toward_start(0.3), optax.sgd(0.1))
    state = tx.init(p0)
    params = {"w": jnp.array([2.0, -2.0]), "b": jnp.array([0.0])}  # moved away from p0
    grads = {"w": jnp.array([0.1, 0.2]), "b": jnp.array([-0.4])}
    updates, _ = tx.update(grads, state, params)
    for k in p0:  # -lr * (g + 0.3 (p - p0))
        np.testing.assert_allclose(updates[k], -0.1 * (grads[k] + 0.3 * (params[k] - p0[k])),
                                   rtol=1e-6)


def test_lora_without_a_trainable_pattern_is_refused():
    from bpkit.config import ConfigError
    with pytest.raises(ConfigError, match=r'optimizer.trainable: \["\*lora_\*"\]'):
        load_config(os.path.join(CONFIGS, "charlm_lora.yaml"), ["optimizer.trainable=[]"])

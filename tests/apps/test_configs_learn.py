"""Each application config as shipped (small sizes through overrides): the gradient of its
train step equals jax.grad's (the check ``bpkit train`` runs before the first step), a short
run learns -- its loss falls, or for reinforcement learning its mean episode return rises --
and its evaluation metrics come out in range. Reaching the targets is the slow tests' job
(test_targets.py).

One test per config shares the model's set-up between the three checks: compiling is most of
their cost. The full parity with float64 finite differences (``bpkit parity``, same sizes)
runs in tests/train/test_parity_configs.py, in the slow run for these configs. The steps
are driven as ``bpkit train`` drives them, without the run directory (checkpoints and plots
are the same code for every config: tests/train)."""
import math
import os

import pytest

import jax
import numpy as np

from bpkit.config import load_config
from bpkit.data import eval_batches, train_batch
from bpkit.train import loop
from bpkit.train.step import evaluate, to_host
from tests.numerics import user_numerics
from tests.train.helpers import CONFIGS

SMALL = {
    "digits_cnn": ["model.args.channels=[8,16]", "data.batch_size=32", "run.steps=40",
                   "optimizer.warmup_steps=5", "data.eval_batch_size=100"],
    "reverse_transformer": ["model.args.d_model=16", "model.args.n_layers=1",
                            "model.args.n_heads=2", "data.context=6", "data.num_train=512",
                            "data.num_test=64", "data.eval_batch_size=64", "run.steps=80",
                            "data.batch_size=32", "optimizer.warmup_steps=5",
                            "optimizer.learning_rate=0.01"],
    "ddpm_2d": ["model.args.hidden=32", "model.args.depth=2", "model.args.num_steps=20",
                "data.batch_size=128", "data.eval_batch_size=128", "run.steps=60",
                "optimizer.warmup_steps=5"],
    "cartpole_reinforce": ["model.args.hidden=[16]", "data.batch_size=16",
                           "data.eval_batch_size=8", "run.steps=20",
                           "optimizer.learning_rate=0.01"],
}
IN_RANGE = {  # evaluation metric -> its valid range
    "digits_cnn": {"accuracy": (0.0, 1.0)},
    "reverse_transformer": {"accuracy": (0.0, 1.0), "token_accuracy": (0.0, 1.0)},
    "ddpm_2d": {"chamfer": (0.0, math.inf)},
    "cartpole_reinforce": {"return": (1.0, 500.0), "greedy_return": (1.0, 500.0)},
}


@pytest.fixture(autouse=True)
def training_numerics():
    with user_numerics():  # as users run training (see tests/numerics.py)
        yield


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_short_run_learns(name):
    cfg = load_config(os.path.join(CONFIGS, f"{name}.yaml"), SMALL[name])
    ds, task, tx, schedule = loop.build(cfg)
    state = loop.init_state(cfg, task, tx)
    report = loop.check_step_parity(task, state.params, train_batch(ds, 0, 2, cfg.run.seed),
                                    jax.random.PRNGKey(0), model_state=state.model_state,
                                    fd=False)
    assert report.ok, str(report)
    step_fn, eval_step = loop.make_steps(cfg, task, tx, schedule)
    history = []
    for step in range(cfg.run.steps):
        state, metrics = step_fn(state, train_batch(ds, step, cfg.data.batch_size, cfg.run.seed))
        history.append(to_host(metrics))
    key = "return" if name == "cartpole_reinforce" else "loss"
    first, last = (sum(m[key] for m in part) / len(part) for part in (history[:5], history[-5:]))
    if key == "return":
        assert last > 1.5 * first
    else:
        assert last < 0.8 * first
    result = evaluate(eval_step, loop.eval_inputs(task, state),
                      eval_batches(ds, cfg.data.eval_batch_size, 1))
    for metric, (lo, hi) in IN_RANGE[name].items():
        assert lo <= result[metric] <= hi, (metric, result[metric])
    if name == "reverse_transformer":  # greedy decoding: each token is its position's argmax
        from bpkit.models.seq2seq import greedy_decode, shift_right
        source = next(eval_batches(ds, 8, 1))["x"]

        @jax.jit
        def decode_and_rescore(params, source):
            decoded = greedy_decode(task.model, params, source, source.shape[1])
            logits = task.model.apply(params, (source, shift_right(decoded, len(ds.vocab))))
            return decoded, jax.numpy.argmax(logits, -1)
        decoded, rescored = decode_and_rescore(state.params, source)
        np.testing.assert_array_equal(decoded, rescored)

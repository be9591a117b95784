"""Config-driven training of a stateful model (BatchNorm, configs/mnist1d_cnn_bn.yaml): the
train step updates the running statistics, checkpoints carry them (a resumed run equals an
uninterrupted one), evaluation uses them (``bpkit eval`` reproduces the run's eval loss;
the initial statistics give another), and fine-tuning starts from them."""
import json
import os

import jax
import numpy as np
import pytest

from bpkit import cli
from bpkit.config import load_config
from bpkit.data import eval_batches
from bpkit.train import checkpoint as ckpt
from bpkit.train import loop
from bpkit.train.step import evaluate
from tests.numerics import user_numerics
from tests.train.helpers import CONFIGS, summary, train_losses

CFG = os.path.join(CONFIGS, "mnist1d_cnn_bn.yaml")
SMALL = ["model.args.channels=[4,4,4]", "data.batch_size=32", "data.eval_batch_size=250",
         "run.log_every=1", "run.eval_every=0", "run.checkpoint_every=3", "run.keep_checkpoints=0",
         "run.progress=log", "run.check_parity=false", "optimizer.schedule=constant",
         "optimizer.warmup_steps=0"]


def _train(run_dir, steps):
    assert cli.main(["train", CFG, *SMALL, f"run.steps={steps}", f"run.out_dir={run_dir}"]) == 0


def _final_state(run_dir):
    cfg = load_config(CFG, SMALL + [f"run.out_dir={run_dir}"])
    _, task, tx, _ = loop.build(cfg)
    like = loop.init_state(cfg, task, tx)
    return cfg, task, like, ckpt.restore_latest(os.path.join(run_dir, "checkpoints"), like)[1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    with user_numerics():  # module-scoped: set up before the autouse training_numerics
        _train(run, 6)
    return run


def test_train_step_updates_the_running_statistics(straight):
    _, task, initial, final = _final_state(straight)
    assert task.stateful
    assert jax.tree_util.tree_structure(final.model_state) == \
        jax.tree_util.tree_structure(initial.model_state)
    for name in ("bn_0", "bn_1", "bn_2"):
        for stat in ("mean", "var"):
            moved = np.abs(np.asarray(final.model_state[name][stat])
                           - np.asarray(initial.model_state[name][stat]))
            assert moved.max() > 1e-3, (name, stat)


def test_resumed_run_equals_an_uninterrupted_one(straight, tmp_path):
    run = tmp_path / "resumed"
    _train(run, 3)
    _train(run, 6)  # the same run continued: resumes from its step-3 checkpoint
    assert train_losses(run) == train_losses(straight)
    assert summary(run)["resumed_from"] == 3
    assert summary(run)["eval_loss"] == summary(straight)["eval_loss"]
    a, b = _final_state(run)[3].model_state, _final_state(straight)[3].model_state
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_evaluation_uses_the_saved_running_statistics(straight, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(straight)]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reported["eval_loss"] == summary(straight)["eval_loss"]
    cfg, task, initial, final = _final_state(straight)
    ds, _, tx, schedule = loop.build(cfg)
    _, eval_step = loop.make_steps(cfg, task, tx, schedule)
    batches = lambda: eval_batches(ds, cfg.data.eval_batch_size, None)  # noqa: E731
    saved = evaluate(eval_step, loop.eval_inputs(task, final), batches())["loss"]
    fresh = evaluate(eval_step, loop.eval_inputs(task, final._replace(
        model_state=initial.model_state)), batches())["loss"]
    assert saved == pytest.approx(reported["eval_loss"], rel=1e-6)
    assert abs(fresh - saved) > 1e-3  # the statistics matter to the evaluation


def test_fine_tuning_starts_from_the_saved_running_statistics(straight):
    """``model.init_from`` loads the parameters and, for a stateful model, the statistics."""
    _, _, initial, final = _final_state(straight)
    cfg = load_config(CFG, SMALL + [f"model.init_from={straight}"])
    _, task, tx, _ = loop.build(cfg)
    start = loop.init_state(cfg, task, tx)
    for got, want in ((start.params, final.params), (start.model_state, final.model_state)):
        for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(x, y)
    assert int(start.step) == 0  # a new run: only the model is carried over

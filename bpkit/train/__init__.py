"""Training: pure train steps on optax, optimizers from config, checkpoints, the run loop.

    >>> tx, schedule = build_optimizer(OptimizerConfig(name="adam", learning_rate=1e-3), 1000)
    >>> state = TrainState.create(params, tx)
    >>> step = make_train_step(loss_fn, tx, engine="bpkit", has_aux=True, schedule=schedule)
    >>> state, metrics = step(state, batch)   # metrics: loss, grad_norm, update_norm, ...
"""
from bpkit.train.optim import build_optimizer, build_schedule, default_decay_mask, frozen_mask
from bpkit.train.state import TrainState
from bpkit.train.step import (
    evaluate,
    make_eval_step,
    make_gan_step,
    make_train_step,
    value_and_grad_for,
    with_compute_dtype,
)

__all__ = ["TrainState", "make_train_step", "make_eval_step", "make_gan_step", "evaluate",
           "build_optimizer", "build_schedule", "default_decay_mask", "frozen_mask",
           "value_and_grad_for", "with_compute_dtype"]

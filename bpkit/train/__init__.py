"""Training: pure train steps on optax, optimizers from config, checkpoints, the run loop.

    >>> tx, schedule = build_optimizer(OptimizerConfig(name="adam", learning_rate=1e-3), 1000)
    >>> state = TrainState.create(params, tx)
    >>> step = make_train_step(loss_fn, tx, engine="bpkit", has_aux=True, schedule=schedule)
    >>> state, metrics = step(state, batch)   # metrics: loss, grad_norm, update_norm, ...

Imports lazily, as ``bpkit`` does: the ``bpkit`` command installs its signal handlers
(``bpkit.train.stopping``) before JAX is imported.
"""
import importlib

_EXPORTS = {
    "build_optimizer": "bpkit.train.optim", "build_schedule": "bpkit.train.optim",
    "default_decay_mask": "bpkit.train.optim", "frozen_mask": "bpkit.train.optim",
    "TrainState": "bpkit.train.state",
    "evaluate": "bpkit.train.step", "make_eval_step": "bpkit.train.step",
    "make_gan_step": "bpkit.train.step", "make_train_step": "bpkit.train.step",
    "value_and_grad_for": "bpkit.train.step", "with_compute_dtype": "bpkit.train.step",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bpkit.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

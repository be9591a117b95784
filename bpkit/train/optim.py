"""Optimizers from a config, all through optax.

``build_optimizer(cfg.optimizer, steps)`` returns ``(tx, schedule)``; the chain is

    pull_toward_start (optional: the gradient of (l2_pull/2) ||params - params_0||^2 added)
    -> clip_by_global_norm (optional)
    -> the named optimizer with the schedule as its learning rate
       (weight decay masked off biases and norm scales by default)
    -> multi_transform that zeroes the updates of frozen paths (optional)
    -> MultiSteps gradient accumulation (optional)

A parameter's *path* is its keys joined by ``/`` (``layers/0/w``); ``freeze``/``trainable``
patterns are matched with ``fnmatch`` against it.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bpkit.nn.core import param_paths, path_str  # noqa: F401  (param_paths re-exported)

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "lion",
              "lamb")
SCHEDULES = ("constant", "linear", "cosine", "exponential", "piecewise")
_NO_DECAY_NAMES = ("b", "bias", "beta", "scale", "gamma", "ln", "norm")


def _map_paths(fn: Callable[[str, Any], Any], params):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), params)


def default_decay_mask(params):
    """True where weight decay applies: leaves of rank >= 2 whose name is not a norm scale."""
    def keep(path, x):
        name = path.split("/")[-1].lower() if path else ""
        return bool(jnp.ndim(x) >= 2 and name not in _NO_DECAY_NAMES)
    return _map_paths(keep, params)


def frozen_mask(params, freeze=(), trainable=()):
    """True where a parameter is frozen (matches ``freeze``, or misses every ``trainable``)."""
    def frozen(path, _):
        if trainable and not any(fnmatch.fnmatch(path, pat) for pat in trainable):
            return True
        return any(fnmatch.fnmatch(path, pat) for pat in freeze)
    return _map_paths(frozen, params)


def build_schedule(c, steps: int) -> Callable:
    lr = c.learning_rate
    decay_steps = c.decay_steps or steps
    if c.schedule == "constant":
        base = optax.constant_schedule(lr)
        if c.warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, lr, c.warmup_steps), base], [c.warmup_steps])
        return base
    if c.schedule == "linear":
        parts = [optax.linear_schedule(lr, lr * c.final_lr_fraction,
                                       max(decay_steps - c.warmup_steps, 1))]
        if c.warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, lr, c.warmup_steps)] + parts, [c.warmup_steps])
        return parts[0]
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if c.warmup_steps else lr, lr, c.warmup_steps, max(decay_steps, c.warmup_steps + 1),
            end_value=lr * c.final_lr_fraction)
    if c.schedule == "exponential":
        return optax.warmup_exponential_decay_schedule(
            0.0 if c.warmup_steps else lr, lr, c.warmup_steps, c.transition_steps, c.decay_rate)
    if c.schedule == "piecewise":
        return optax.piecewise_constant_schedule(
            lr, {int(b): float(s) for b, s in zip(c.boundaries, c.scales)})
    raise ValueError(f"unknown schedule {c.schedule!r}; expected one of {', '.join(SCHEDULES)}")


def _base_optimizer(c, schedule, decay_mask):
    wd = c.weight_decay
    name = c.name
    if name == "sgd":
        tx = optax.sgd(schedule)
    elif name == "momentum":
        tx = optax.sgd(schedule, momentum=c.momentum)
    elif name == "nesterov":
        tx = optax.sgd(schedule, momentum=c.momentum, nesterov=True)
    elif name == "adam":
        tx = optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps)
    elif name == "adamw":
        return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=wd,
                           mask=decay_mask)
    elif name == "rmsprop":
        tx = optax.rmsprop(schedule, decay=c.b2 if c.b2 < 0.999 else 0.9, eps=c.eps,
                           momentum=c.momentum or None)
    elif name == "adagrad":
        tx = optax.adagrad(schedule, eps=c.eps)
    elif name == "lion":
        return optax.lion(schedule, b1=c.b1, b2=c.b2 if c.b2 < 0.999 else 0.99,
                          weight_decay=wd, mask=decay_mask)
    elif name == "lamb":
        return optax.lamb(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=wd,
                          mask=decay_mask)
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if wd:  # coupled L2 for the optimizers that have no decoupled decay of their own
        tx = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), tx)
    return tx


class PullState(NamedTuple):
    anchor: Any  # the parameters the optimizer was initialised with


def pull_toward_start(strength: float) -> optax.GradientTransformation:
    """Add ``strength * (params - params_0)`` to the gradient: the gradient of the penalty
    ``(strength / 2) ||params - params_0||^2`` (L2-SP, Li et al. 2018), where ``params_0``
    are the parameters at ``init`` -- after ``model.init_from``, the pre-trained weights, so
    fine-tuning is held near them. The anchor lives in the optimizer state (checkpointed and
    resumed with it)."""
    def init(params):
        return PullState(jax.tree_util.tree_map(jnp.asarray, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("pull_toward_start needs the parameters: call "
                             "update(grads, state, params).")
        pulled = jax.tree_util.tree_map(lambda g, p, p0: g + strength * (p - p0),
                                        updates, params, state.anchor)
        return pulled, state

    return optax.GradientTransformation(init, update)


def build_optimizer(c, steps: int, *, learning_rate: float | None = None):
    """``(tx, schedule)`` for the ``optimizer`` config section ``c`` and a run of ``steps``."""
    if learning_rate is not None:
        import dataclasses
        c = dataclasses.replace(c, learning_rate=learning_rate)
    # With accumulation the optimizer (and its schedule) counts applied updates, not micro-steps.
    schedule = build_schedule(c, max(steps // c.accumulate_steps, 1))
    decay_mask = {"default": default_decay_mask, "all": None, "none": None}[c.decay_mask]
    if c.decay_mask == "none":
        c = _with(c, weight_decay=0.0)
    tx = _base_optimizer(c, schedule, decay_mask)
    if c.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
    if c.l2_pull:
        tx = optax.chain(pull_toward_start(c.l2_pull), tx)
    if c.freeze or c.trainable:
        freeze, trainable = tuple(c.freeze), tuple(c.trainable)
        labels = lambda params: jax.tree_util.tree_map(  # noqa: E731
            lambda f: "frozen" if f else "train", frozen_mask(params, freeze, trainable))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    if c.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=c.accumulate_steps)
    return tx, schedule


def _with(c, **kw):
    import dataclasses
    return dataclasses.replace(c, **kw)

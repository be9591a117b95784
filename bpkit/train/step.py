"""Pure train and eval steps (the flax-examples shape: ``step(state, batch) -> (state, metrics)``).

``make_train_step(loss_fn, optimizer, engine="bpkit")`` differentiates ``loss_fn`` with bpkit's
engine (``engine="jax"``: with ``jax.value_and_grad``, the reference), applies the optax
``optimizer`` and returns a jit-compiled step with the state donated. ``loss_fn(params, batch,
key)`` returns the scalar loss, or ``(loss, metrics)`` with ``has_aux=True`` where ``metrics``
is a dict of scalars (accuracy, say).

Models with state that is updated by the forward pass but not by gradients (BatchNorm running
statistics) use ``has_state=True``: ``loss_fn(params, batch, key, model_state)`` returns
``(loss, (metrics, new_model_state))``, and the step writes ``new_model_state`` into
``state.model_state`` (not differentiated; kept unchanged on a skipped non-finite step).

Metrics of every step: ``loss``, ``grad_norm`` (global norm of the gradient), ``update_norm``
(of the optimizer's update), ``learning_rate`` (when a schedule is given), ``skipped`` (1 when a
non-finite loss or gradient left the state unchanged, with ``skip_nonfinite=True``), plus the
loss function's own metrics.
"""
from __future__ import annotations

import functools

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from bpkit import sharding
from bpkit.engine import api, compat
from bpkit.train.state import TrainState

ENGINES = ("bpkit", "jax")
AUTO = "auto"
_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


class _Jitted:
    """``jax.jit(fn, donate_argnums=..., compiler_options=...)``, built on first use (a call,
    ``.lower``, ...): ``"auto"`` options depend on the backend, and asking for it would start
    JAX's backends, which building a step must not do (``jax.distributed.initialize`` and
    ``bpkit.reuse_host_memory`` have to come before that)."""

    def __init__(self, fn: Callable, compiler_options, donate: bool):
        self._fn, self._options, self._donate, self._jitted = fn, compiler_options, donate, None
        functools.update_wrapper(self, fn)

    def jitted(self) -> Callable:
        """The ``jax.jit`` function. ``compiler_options="auto"`` takes the options measured
        faster than XLA's defaults on this JAX release and backend
        (``compat.step_compiler_options``: on CPU, no copies of loop carries, an LSTM step
        0.93x as long, and on JAX 0.10 and 0.12 XLA's own convolutions, a 2-D CNN step 0.8x and
        0.9-1.0x); ``None`` or ``{}``: XLA's defaults."""
        if self._jitted is None:
            options = self._options
            if options == AUTO:
                options = compat.step_compiler_options(jax.default_backend())
            self._jitted = jax.jit(self._fn, donate_argnums=(0,) if self._donate else (),
                                   compiler_options=options or None)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self.jitted()(*args, **kwargs)

    def __getattr__(self, name):  # lower, trace, eval_shape, ... of the jitted function
        if name in ("_fn", "_options", "_donate", "_jitted"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.jitted(), name)


def value_and_grad_for(engine: str, remat=None, remat_budget_bytes: int | None = None
                       ) -> Callable:
    """The ``value_and_grad`` of ``engine``: bpkit's, or jax's as the reference, with the
    ``remat`` setting (see ``bpkit.grad``; for jax a checkpoint policy, by
    ``jax.checkpoint(loss, policy=...)``: ``"auto"`` is bpkit's own)."""
    if engine == "bpkit":
        if remat is None and remat_budget_bytes is None:
            return api.value_and_grad
        api.remat_policy(remat, remat_budget_bytes)  # a bad setting is reported now
        return functools.partial(api.value_and_grad, remat=remat,
                                 remat_budget_bytes=remat_budget_bytes)
    if engine == "jax":
        policy = api.remat_policy(remat, remat_budget_bytes)
        if policy == "auto":
            raise ValueError("remat='auto' is bpkit's own plan; with engine='jax' use remat=None "
                             "or a jax.checkpoint policy name.")
        if policy is None:
            return jax.value_and_grad
        return lambda fun, **kw: jax.value_and_grad(jax.checkpoint(fun, policy=policy), **kw)
    raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")


def _cast_floats(tree, dtype):
    def cast(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.asarray(x).astype(dtype)
        return x
    return jax.tree_util.tree_map(cast, tree)


def with_compute_dtype(loss_fn: Callable, dtype, has_aux: bool) -> Callable:
    """``loss_fn`` run in ``dtype`` (e.g. bfloat16) on float32 master parameters.

    The casts are inside the differentiated function, so gradients arrive in float32."""
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return loss_fn

    def cast_loss(params, batch, key, *model_state):
        out = loss_fn(_cast_floats(params, dtype), _cast_floats(batch, dtype), key, *model_state)
        if has_aux:
            loss, aux = out
            return loss.astype(jnp.float32), _cast_floats(aux, jnp.float32)
        return out.astype(jnp.float32)
    return cast_loss


def _select(ok, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def _stateful_aux(aux, old_model_state):
    """``(metrics, new_model_state)`` from a ``has_state`` loss function's aux output, checked
    against the old state's structure (a mismatch would silently retrace or fail under jit)."""
    if not (isinstance(aux, (tuple, list)) and len(aux) == 2):
        raise TypeError("make_train_step(has_state=True): loss_fn must return (loss, (metrics, "
                        f"new_model_state)); its second output was a {type(aux).__name__}. "
                        "Return ({}, new_model_state) when there are no metrics.")
    metrics, new_model_state = aux
    old, new = (jax.tree_util.tree_structure(t) for t in (old_model_state, new_model_state))
    if old != new:
        raise ValueError("make_train_step(has_state=True): the new model state has a different "
                         f"structure from state.model_state ({new} vs {old}); return the "
                         "updated state with the same keys (TrainState.create(model_state=...)).")
    return metrics, new_model_state


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    engine: str = "bpkit", has_aux: bool = False, has_state: bool = False,
                    schedule: Callable | None = None, accumulate_steps: int = 1,
                    compute_dtype=None, skip_nonfinite: bool = False, jit: bool = True,
                    donate: bool = True, dp: tuple[float, float] | None = None,
                    remat=None, remat_budget_bytes: int | None = None,
                    compiler_options: dict | str | None = AUTO) -> Callable:
    """A pure ``step(state, batch) -> (state, metrics)`` for ``loss_fn`` and ``optimizer``.

    ``has_state=True``: ``loss_fn(params, batch, key, model_state) -> (loss, (metrics,
    new_model_state))`` (see the module docstring; ``has_aux`` is then implied).
    ``schedule`` (step -> learning rate) is only reported, as ``metrics["learning_rate"]``;
    with gradient accumulation (``optax.MultiSteps``) pass ``accumulate_steps`` so the reported
    rate follows the optimizer's own count. ``dp=(l2_clip, noise_multiplier)``: DP-SGD's
    clipped, noised gradient (``bpkit.train.dp``; the loss must average over the batch).
    ``remat``, ``remat_budget_bytes``: which forward values the backward keeps (``bpkit.grad``).
    ``compiler_options`` go to ``jax.jit``: ``"auto"`` (default) the XLA options measured
    faster than XLA's defaults on the installed JAX and backend
    (``bpkit.engine.compat.step_compiler_options``), ``None`` XLA's defaults, or your own dict.
    """
    has_aux = has_aux or has_state
    if dp is not None:
        from bpkit.train.dp import dp_value_and_grad
        vg = dp_value_and_grad(with_compute_dtype(loss_fn, compute_dtype, has_aux), *dp,
                               has_aux=has_aux)
    else:
        vg = value_and_grad_for(engine, remat, remat_budget_bytes)(
            with_compute_dtype(loss_fn, compute_dtype, has_aux), has_aux=has_aux)

    def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
        model_state = (state.model_state,) if has_state else ()
        out, grads = vg(state.params, batch, state.step_key(), *model_state)
        loss, aux = out if has_aux else (out, {})
        new_model_state = state.model_state
        if has_state:
            aux, new_model_state = _stateful_aux(aux, state.model_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": _norm(grads),
                   "update_norm": _norm(updates), **aux}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step // accumulate_steps),
                                                   jnp.float32)
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
            params = _select(ok, params, state.params)
            opt_state = _select(ok, opt_state, state.opt_state)
            new_model_state = _select(ok, new_model_state, state.model_state)
            metrics["skipped"] = (~ok).astype(jnp.int32)
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                             model_state=new_model_state)
        return new, metrics

    if not jit:
        return step
    return _Jitted(step, compiler_options, donate)


def make_gan_step(d_loss_fn: Callable, g_loss_fn: Callable,
                  d_optimizer: optax.GradientTransformation,
                  g_optimizer: optax.GradientTransformation, *, engine: str = "bpkit",
                  d_schedule: Callable | None = None, g_schedule: Callable | None = None,
                  jit: bool = True, donate: bool = True, remat=None,
                  remat_budget_bytes: int | None = None,
                  compiler_options: dict | str | None = AUTO) -> Callable:
    """Two losses, two optimizers: a discriminator update, then a generator update.

    ``state.params`` and ``state.opt_state`` are ``{"generator": ..., "discriminator": ...}``.
    ``d_loss_fn(d_params, g_params, batch, key)`` and ``g_loss_fn(g_params, d_params, batch,
    key)`` return scalars; the generator step sees the updated discriminator.
    ``compiler_options``: as in ``make_train_step``.
    """
    vg = value_and_grad_for(engine, remat, remat_budget_bytes)

    def step(state: TrainState, batch):
        key_d, key_g = jax.random.split(state.step_key())
        g, d = state.params["generator"], state.params["discriminator"]
        d_loss, d_grads = vg(d_loss_fn)(d, g, batch, key_d)
        d_updates, d_opt = d_optimizer.update(d_grads, state.opt_state["discriminator"], d)
        d = optax.apply_updates(d, d_updates)
        g_loss, g_grads = vg(g_loss_fn)(g, d, batch, key_g)
        g_updates, g_opt = g_optimizer.update(g_grads, state.opt_state["generator"], g)
        g = optax.apply_updates(g, g_updates)
        metrics = {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
                   "grad_norm": _norm((d_grads, g_grads)),
                   "update_norm": _norm((d_updates, g_updates))}
        if g_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(g_schedule(state.step), jnp.float32)
        if d_schedule is not None:
            metrics["d_learning_rate"] = jnp.asarray(d_schedule(state.step), jnp.float32)
        new = state._replace(step=state.step + 1,
                             params={"generator": g, "discriminator": d},
                             opt_state={"generator": g_opt, "discriminator": d_opt})
        return new, metrics

    if not jit:
        return step
    return _Jitted(step, compiler_options, donate)


def make_eval_step(metric_fn: Callable, *, jit: bool = True,
                   compiler_options: dict | str | None = AUTO) -> Callable:
    """``eval_step(params, batch) -> sums``: ``metric_fn(params, batch)`` gives a dict of
    per-example values ``(B,)``; they are summed with ``batch["mask"]`` (1 = real row) as
    weights, and ``"count"`` holds the number of real rows. Divide by it for means.
    ``compiler_options``: as in ``make_train_step``."""
    def eval_step(params, batch):
        per_example = metric_fn(params, batch)
        any_value = next(iter(per_example.values()))
        mask = batch.get("mask", jnp.ones(any_value.shape[:1], jnp.float32))
        sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in per_example.items()}
        sums["count"] = jnp.sum(mask)
        return sums
    return _Jitted(eval_step, compiler_options, donate=False) if jit else eval_step


def evaluate(eval_step: Callable, params, batches) -> dict[str, float]:
    """Means over all batches of ``eval_step``'s per-example metrics."""
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in eval_step(params, batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count", 0.0)
    return {k: v / count for k, v in totals.items()} if count else {}


def to_host(metrics) -> dict[str, float]:
    """Plain floats of a step's metrics: their global values (the same in every process)."""
    return {k: float(sharding.host_value(v)) for k, v in metrics.items()}

"""A config's model and loss: ``build_task(cfg, dataset) -> Task``.

``model.name`` names a factory in ``bpkit.models``; ``model.args`` are its keyword arguments,
checked against its schema in ``bpkit.validate.MODEL_ARGS`` (an unknown argument gets the
closest valid one; types, sizes and activations are checked, and gpt's heads must divide its
width). Arguments the data determines (``in_features``, ``in_length``, ``in_shape``,
``num_classes``, ``vocab_size``, ``context``) are filled in from the dataset when not given.

Task kinds: ``classifier`` (softmax cross-entropy + accuracy), ``lm`` (next-token
cross-entropy), ``regression`` (MSE or Huber), ``gan`` (non-saturating GAN: two losses), and
the kinds of bpkit/train/app_tasks.py (``seq2seq``, ...).

A stateful model (BatchNorm: ``Model.init_state``) makes a stateful task: its ``loss_fn`` takes
and returns the running statistics, as ``make_train_step(has_state=True)`` expects, and its
``metric_fn`` evaluates with them.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bpkit.config import ConfigError
from bpkit.data import Dataset, validate_dataset
from bpkit.models.adapters import call_factory, check_factory_args, is_user_model, load_factory
from bpkit.validate import ALIASES, MODEL_NAMES, model_problems, report  # noqa: F401


@dataclass
class Task:
    kind: str                                   # classifier | lm | regression | gan
    model: Any                                  # a Model, or (generator, discriminator)
    init: Callable                              # key -> params
    loss_fn: Callable | None = None             # (params, batch, key) -> (loss, metrics)
    metric_fn: Callable | None = None           # (params, batch) -> per-example metrics
    d_loss_fn: Callable | None = None           # GAN
    g_loss_fn: Callable | None = None           # GAN
    latent_dim: int | None = None               # GAN
    model_args: dict | None = None
    # Stateful tasks: () -> model_state; loss_fn(params, batch, key, model_state) -> (loss,
    # (metrics, new_model_state)); metric_fn(params, batch, model_state).
    init_state: Callable | None = None

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


def _run(model, params, x, *, key=None, train=False, state=None):
    """``(output, new_state)`` of ``model`` on ``x`` (``state`` passes through a stateless
    model unchanged)."""
    if model.stateful:
        return model.apply(params, x, key=key, train=train, state=state)
    return model.apply(params, x, key=key, train=train), state


def _task(kind: str, model, loss_core: Callable, metric_core: Callable, args: dict) -> Task:
    """A task from ``loss_core(params, batch, key, state) -> (loss, metrics, new_state)`` and
    ``metric_core(params, batch, state)``: stateful when ``model`` is, else the state-free
    signatures of ``Task``."""
    if model.stateful:
        def loss_fn(params, batch, key, model_state):
            loss, metrics, new_state = loss_core(params, batch, key, model_state)
            return loss, (metrics, new_state)

        return Task(kind, model, model.init, loss_fn, metric_core, model_args=args,
                    init_state=model.init_state)
    return Task(kind, model, model.init, lambda p, b, k: loss_core(p, b, k, None)[:2],
                lambda p, b: metric_core(p, b, None), model_args=args)


def _factory(name: str):
    """``(factory name, factory)`` of ``model.name`` (aliases resolved; a user's
    ``file.py:factory`` imported)."""
    if is_user_model(name):
        return name, load_factory(name)
    problems = model_problems(name, {})
    if problems:
        raise ConfigError(report(problems), problems)
    from bpkit import models
    name = ALIASES.get(name, name)
    return name, getattr(models, name)


def _check_args(name: str, fn, args: dict) -> dict:
    """``args`` checked against the factory's schema (``bpkit.validate.MODEL_ARGS``: unknown
    keys, types, sizes; config loading has already done this for a config), with lists
    turned into tuples where the factory's default is a tuple. A user's factory: against its
    signature."""
    if is_user_model(name):
        check_factory_args(name, fn, args)
        return dict(args)
    problems = model_problems(name, args)
    if problems:
        raise ConfigError(report(problems), problems)
    params = inspect.signature(fn).parameters
    return {k: tuple(v) if isinstance(params[k].default, tuple) and isinstance(v, list) else v
            for k, v in args.items()}


def _fill(fn, args: dict, **available) -> dict:
    names = inspect.signature(fn).parameters
    for key, value in available.items():
        if key in names and key not in args and value is not None:
            args[key] = value
    return args


def _labels_loss(cfg):
    from bpkit.nn import losses
    ls = cfg.model.label_smoothing

    def ce(logits, labels):
        return losses.softmax_cross_entropy(logits, labels, label_smoothing=ls)
    return ce


def build_task(cfg, ds: Dataset) -> Task:
    """The model, loss and metrics of ``cfg`` for ``ds``; validates that they fit."""
    name, fn = _factory(cfg.model.name)
    args = _check_args(name, fn, dict(cfg.model.args))
    from bpkit.train.app_tasks import BUILDERS  # seq2seq, diffusion, reinforcement learning
    if name in BUILDERS:
        return BUILDERS[name](cfg, name, fn, args, ds)
    if is_user_model(name):  # any library's model, as a bpkit Model (bpkit.models.adapters)
        if cfg.model.loss == "gan" or ds.kind == "sampler":
            raise ConfigError("model.name: a GAN needs a generator and a discriminator; "
                              "your own factory is supported for classifiers, language "
                              "models and regression (use model.name=gan_2d)")
        args = _fill(fn, args, seed=cfg.run.seed)
        user_fn = fn

        @functools.wraps(user_fn)  # keeps the signature: _fill sees the factory's arguments
        def fn(**kw):
            example = (ds.x_train[:ds.context][None] if ds.kind == "lm"
                       else ds.x_train[:1])
            return call_factory(name, user_fn, kw, example)
    if name == "gan_2d" or cfg.model.loss == "gan":
        return _gan_task(cfg, name, fn, args, ds)
    if ds.kind == "lm":
        args = _fill(fn, args, vocab_size=len(ds.vocab), context=ds.context)
        model = fn(**args)
        validate_dataset(ds, vocab_size=args.get("vocab_size"))
        return _lm_task(cfg, model, args)
    if ds.kind in ("classification", "regression"):
        shape = ds.x_train.shape[1:]
        feat = int(shape[-1]) if len(shape) else 1
        args = _fill(fn, args, in_features=feat if len(shape) == 1 else None,
                     in_length=int(shape[0]) if len(shape) == 1 else None,
                     in_shape=[int(n) for n in shape] if len(shape) == 3 else None,
                     num_classes=ds.num_classes)
        if name in ("gru_classifier", "lstm_classifier"):
            args.pop("in_features", None) if "in_features" not in cfg.model.args else None
        model = fn(**args)
        _check_fit(cfg, model, ds, args)
        if ds.kind == "classification":
            if cfg.model.loss != "cross_entropy":
                raise ConfigError(f"model.loss: {cfg.model.loss!r} does not fit a "
                                  "classification set; use cross_entropy")
            return _classifier_task(cfg, model, args)
        if cfg.model.loss not in ("mse", "huber"):
            raise ConfigError(f"model.loss: {cfg.model.loss!r} does not fit a regression set; "
                              "use mse or huber")
        return _regression_task(cfg, model, args)
    raise ConfigError(f"model {name} does not fit data.name={cfg.data.name} ({ds.kind} data)")


def _check_fit(cfg, model, ds, args):
    """Run the model on two examples: a clear error if features or classes do not fit."""
    from bpkit.data import DataError
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))  # shapes only: no memory
    state = jax.eval_shape(model.init_state) if model.stateful else None
    try:
        out = jax.eval_shape(lambda p, x, s: _run(model, p, x, state=s)[0], params,
                             ds.x_train[:2], state)
    except Exception as e:
        raise DataError(f"data does not fit model {cfg.model.name}: examples of shape "
                        f"{tuple(ds.x_train.shape[1:])} fail in the model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if ds.kind == "classification":
        validate_dataset(ds, num_classes=int(out.shape[-1]))
    elif tuple(out.shape[1:]) != tuple(ds.y_train.shape[1:]):
        raise DataError(f"data does not fit model {cfg.model.name}: it outputs "
                        f"{tuple(out.shape[1:])} per example, the targets are "
                        f"{tuple(ds.y_train.shape[1:])}")


def _classifier_task(cfg, model, args) -> Task:
    ce = _labels_loss(cfg)

    def loss_core(params, batch, key, state):
        logits, state = _run(model, params, batch["x"], key=key, train=True, state=state)
        loss = jnp.mean(ce(logits, batch["y"]))                                # logits (B, C)
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32))
        return loss, {"accuracy": jax.lax.stop_gradient(acc)}, state

    def metric_core(params, batch, state):
        logits, _ = _run(model, params, batch["x"], state=state)
        return {"loss": ce(logits, batch["y"]),
                "accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}

    return _task("classifier", model, loss_core, metric_core, args)


def _lm_task(cfg, model, args) -> Task:
    ce = _labels_loss(cfg)

    def loss_core(params, batch, key, state):
        logits, state = _run(model, params, batch["x"], key=key, train=True, state=state)
        return jnp.mean(ce(logits, batch["y"])), {}, state                   # logits (B, T, V)

    def metric_core(params, batch, state):
        logits, _ = _run(model, params, batch["x"], state=state)
        per_token = ce(logits, batch["y"])                                    # (B, T)
        acc = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return {"loss": jnp.mean(per_token, -1), "accuracy": jnp.mean(acc, -1)}

    return _task("lm", model, loss_core, metric_core, args)


def _regression_task(cfg, model, args) -> Task:
    from bpkit.nn import losses
    per_example = losses.mse if cfg.model.loss == "mse" else losses.huber    # (B, ...) -> (B,)

    def loss_core(params, batch, key, state):
        pred, state = _run(model, params, batch["x"], key=key, train=True, state=state)
        return jnp.mean(per_example(pred, batch["y"])), {}, state

    def metric_core(params, batch, state):
        return {"loss": per_example(_run(model, params, batch["x"], state=state)[0],
                                    batch["y"])}

    return _task("regression", model, loss_core, metric_core, args)


def _gan_task(cfg, name, fn, args, ds) -> Task:
    from bpkit.nn import losses
    if ds.kind != "sampler":
        raise ConfigError(f"model {name} is a GAN and needs data.name=toy2d, not "
                          f"data.name={cfg.data.name}")
    generator, discriminator = fn(**args)
    latent = args.get("latent_dim", inspect.signature(fn).parameters["latent_dim"].default)
    bce = losses.binary_cross_entropy_with_logits

    def fake(g, key, n):
        z = jax.random.normal(key, (n, latent), jnp.float32)                 # (B, latent)
        return generator.apply(g, z)

    def d_loss_fn(d, g, batch, key):
        x = batch["x"]
        x_fake = jax.lax.stop_gradient(fake(g, key, x.shape[0]))
        real = discriminator.apply(d, x)                              # (B,)
        gen = discriminator.apply(d, x_fake)
        return jnp.mean(bce(real, jnp.ones_like(real))) + jnp.mean(bce(gen, jnp.zeros_like(gen)))

    def g_loss_fn(g, d, batch, key):
        gen = discriminator.apply(d, fake(g, key, batch["x"].shape[0]))
        return jnp.mean(bce(gen, jnp.ones_like(gen)))                         # non-saturating

    def metric_fn(params, batch):
        """Per held-out real point ``x_i`` and one generated point ``f_i`` (fixed latent
        draws): the two losses, and the chamfer distance (``chamfer_distance``)."""
        g, d, x = params["generator"], params["discriminator"], batch["x"]      # x (B, 2)
        x_fake = fake(g, jax.random.PRNGKey(0), x.shape[0])                     # (B, 2)
        real, gen = discriminator.apply(d, x), discriminator.apply(d, x_fake)   # (B,)
        d_loss = bce(real, jnp.ones_like(real)) + bce(gen, jnp.zeros_like(gen))
        g_loss = bce(gen, jnp.ones_like(gen))
        return {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
                "chamfer": chamfer_distance(x_fake, x)}

    def init(key):
        kg, kd = jax.random.split(key)
        return {"generator": generator.init(kg), "discriminator": discriminator.init(kd)}

    return Task("gan", (generator, discriminator), init, metric_fn=metric_fn,
                d_loss_fn=d_loss_fn, g_loss_fn=g_loss_fn, latent_dim=latent, model_args=args)


def chamfer_distance(generated, real):
    """Per pair ``i`` of a generated point ``f_i`` and a held-out real point ``x_i`` (both
    ``(B, D)``): the symmetric nearest-neighbour ("chamfer") distance ``(min_j |f_i - x_j| +
    min_j |x_i - f_j|) / 2``, ``(B,)``. Its mean falls towards the noise scale as the
    generated points cover the data and only the data; the generative tasks (GAN,
    diffusion) report it as ``chamfer`` on the same held-out points."""
    dist = jnp.sqrt(jnp.sum(jnp.square(generated[:, None, :] - real[None, :, :]), -1))  # (B, B)
    return 0.5 * (jnp.min(dist, axis=1) + jnp.min(dist, axis=0))

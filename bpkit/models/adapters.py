"""Your own model in a config: ``model.name: path/to/file.py:factory`` or
``package.module:factory``.

The factory is called with ``model.args`` (and, where its signature takes them and the config
does not give them, ``in_features``, ``in_length``, ``num_classes``, ``vocab_size``,
``context`` from the data and ``seed`` from ``run.seed``), and returns one of

* a ``bpkit.models.Model`` (``init(key) -> params``, ``apply(params, x, *, key, train)``), or a
  ``bpkit.nn`` layer;
* a Flax linen module (``module.init(key, x)["params"]``; other variable collections, such as
  ``batch_stats``, become the model state, updated when training);
* a Flax NNX module (its ``nnx.Param`` state as the parameters: initialised by the factory,
  which may take ``seed``);
* an Equinox module (its floating-point arrays as the parameters; applied to one example and
  ``jax.vmap``-ed over the batch, as Equinox models are written);
* a Haiku ``hk.transform``-ed function (``hk.transform_with_state``: stateful).

``as_model(obj, example)`` turns any of them into a ``Model`` whose parameters are a pytree
of arrays, so the same loop, optimizers, checkpoints, diagnostics and first-batch parity check
(bpkit vs ``jax.grad``) apply. Flax, Equinox and Haiku are imported only when such an object
arrives (none of them is a dependency of bpkit).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

import jax
import numpy as np

from bpkit.config import ConfigError
from bpkit.validate import user_model_problems as reference_problems
from bpkit.models.core import Model, from_layer


def is_user_model(name: str) -> bool:
    """``model.name`` names a user's factory (``file.py:factory`` or ``module:factory``)."""
    return ":" in str(name)


def load_factory(name: str) -> Callable:
    """The factory that ``name`` refers to (importing its file or module)."""
    problems = reference_problems(name)
    if problems:
        raise ConfigError(problems[0])
    where, _, attr = name.rpartition(":")
    try:
        if where.endswith(".py"):
            path = os.path.abspath(where)
            mod_name = "bpkit_user_model_" + str(abs(hash(path)))
            module = sys.modules.get(mod_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise ConfigError(f"model.name: cannot import {where!r} ({e}); install the package "
                          "or give the path of a .py file") from None
    except Exception as e:
        raise ConfigError(f"model.name: importing {where} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); fix the module") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_") and
                         getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"model.name: {where} has no function {attr!r}; it defines "
                          f"{', '.join(defined) or 'no public functions'}.")
    return fn


def check_factory_args(name: str, fn: Callable, args: dict) -> None:
    """``model.args`` against the factory's signature: every key must be a parameter (the
    ones the data gives, such as ``in_features``, are filled in later)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in args if k not in params]
    if unknown:
        raise ConfigError(f"model.args.{unknown[0]}: {name} takes no argument {unknown[0]!r}; "
                          f"its arguments are {', '.join(params) or 'none'}.")


# ----------------------------------------------------------------------------- adapters

def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _flax_linen(module, example) -> Model:
    """A linen module: ``params`` trained, other collections (``batch_stats``) as state."""
    call = type(module).__call__
    flags = {k: k for k in ("train", "deterministic", "training") if _takes(call, k)}
    variables = jax.eval_shape(functools.partial(module.init, **_mode(flags, False)),
                               jax.random.PRNGKey(0), example)
    stateful = any(k != "params" for k in variables)

    def kwargs_for(train):
        return _mode(flags, train)

    def init(key):
        k_params, k_dropout = jax.random.split(key)
        v = module.init({"params": k_params, "dropout": k_dropout}, example, **kwargs_for(False))
        return v["params"]

    def run(params, x, key, train, state):
        rngs = {"dropout": key} if key is not None else {}
        mutable = [k for k in state] if (train and state) else False
        out = module.apply({"params": params, **(state or {})}, x, rngs=rngs, mutable=mutable,
                           **kwargs_for(train))
        if mutable:
            y, new = out
            return y, {**state, **new}
        return out, state

    if not stateful:
        return Model(init, lambda params, x, *, key=None, train=False:
                     run(params, x, key, train, None)[0])

    def init_state():
        v = module.init(jax.random.PRNGKey(0), example, **kwargs_for(False))
        return {k: val for k, val in v.items() if k != "params"}

    def apply(params, x, *, key=None, train=False, state):
        return run(params, x, key, train, state)
    return Model(init, apply, init_state)


def _mode(flags: dict, train: bool) -> dict:
    """Linen's train/deterministic keyword arguments for training or evaluation."""
    return {k: (train if k in ("train", "training") else not train) for k in flags}


def _flax_nnx(module) -> Model:
    """An NNX module: its ``nnx.Param`` state (as a pure dict) is the parameters."""
    from flax import nnx
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    pure = nnx.to_pure_dict(params) if hasattr(nnx, "to_pure_dict") else params.to_pure_dict()

    def init(key):
        del key  # initialised by the factory (pass `seed` to it to vary the initialisation)
        return jax.tree_util.tree_map(lambda a: jax.numpy.array(a), pure)

    def apply(p, x, *, key=None, train=False):
        state = jax.tree_util.tree_map(lambda a: a, params)  # a copy to fill
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state, rest)(x)
    return Model(init, apply)


def _equinox(module) -> Model:
    """An Equinox module: floating-point arrays are the parameters; applied per example."""
    import equinox as eqx
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def init(key):
        del key  # initialised by the factory (it may take `seed` for its PRNG key)
        return params

    def apply(p, x, *, key=None, train=False):
        model = eqx.combine(p, static)
        return jax.vmap(model)(x)
    return Model(init, apply)


def _haiku(transformed, example) -> Model:
    import haiku as hk
    if isinstance(transformed, hk.TransformedWithState):
        def init(key):
            return transformed.init(key, example)[0]

        def init_state():
            return transformed.init(jax.random.PRNGKey(0), example)[1]

        def apply(params, x, *, key=None, train=False, state):
            y, new_state = transformed.apply(params, state, key, x)
            return y, (new_state if train else state)
        return Model(init, apply, init_state)
    return Model(lambda key: transformed.init(key, example),
                 lambda params, x, *, key=None, train=False: transformed.apply(params, key, x))


def _library(obj) -> str | None:
    """Which library ``obj`` comes from, by its classes' modules (nothing imported)."""
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root in ("flax", "equinox", "haiku"):
            if root == "flax":
                return "nnx" if ".nnx" in cls.__module__ else "linen"
            return root
    return None


def call_factory(name: str, fn: Callable, args: dict, example: np.ndarray) -> Model:
    """``as_model(fn(**args), example)``; a factory that cannot be called with ``args`` is a
    config error naming what is missing."""
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as e:
        raise ConfigError(f"model.args: {name} cannot be called with {args} ({e}); set the "
                          "missing arguments under model.args") from None
    return as_model(fn(**args), example)


def as_model(obj: Any, example: np.ndarray) -> Model:
    """A ``Model`` from what a factory returned (see the module docstring); ``example`` is
    one batch of inputs (``(1, ...)``), used to initialise Flax and Haiku models."""
    from bpkit.nn.core import Layer
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, Layer):
        return from_layer(obj, tuple(example.shape[1:]))
    lib = _library(obj)
    if lib == "linen":
        return _flax_linen(obj, example)
    if lib == "nnx":
        return _flax_nnx(obj)
    if lib == "equinox":
        return _equinox(obj)
    if lib == "haiku":
        return _haiku(obj, example)
    if isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj):
        init, apply = obj
        return Model(init, lambda params, x, *, key=None, train=False: apply(params, x))
    raise ConfigError(f"model.name: the factory returned a {type(obj).__name__}; return a "
                      "bpkit Model (init, apply), a bpkit.nn layer, a Flax linen or NNX module, "
                      "an Equinox module, or a Haiku transformed function.")

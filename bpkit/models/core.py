"""The model contract: ``Model(init, apply)``.

``init(key) -> params`` (float32, a plain nested dict); ``apply(params, x, *, key=None,
train=False) -> output``. ``key`` feeds dropout when ``train=True``.

Stateful models (with BatchNorm) also have ``init_state() -> model_state`` (the running
statistics, a plain nested dict), and their ``apply`` takes ``state=model_state`` and returns
``(output, new_model_state)``; the new state differs from the old only when ``train=True``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp

from bpkit.nn.core import Layer


class Model(NamedTuple):
    """A model as a pair of pure functions (and ``init_state`` when stateful)."""

    init: Callable[[Any], Any]
    apply: Callable[..., Any]
    init_state: Optional[Callable[[], Any]] = None

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


def from_layer(net: Layer, in_shape: tuple, *, prepare: Callable | None = None,
               dtype=jnp.float32) -> Model:
    """A ``Model`` from a layer initialised for per-example ``in_shape``; stateful when the
    layer is (see the module docstring).

    ``prepare(x)`` (optional) reshapes the raw batch before the layer (e.g. ``(B, 40)`` to
    ``(B, 40, 1)``).
    """
    def init(key):
        return net.init(key, in_shape, dtype)[0]

    if not net.stateful:
        def apply(params, x, *, key=None, train=False):
            return net.apply(params, prepare(x) if prepare else x, key=key, train=train)

        return Model(init, apply)

    def init_state():
        return net.init_state(in_shape, dtype)

    def apply_stateful(params, x, *, key=None, train=False, state):
        return net.apply(params, prepare(x) if prepare else x, key=key, train=train, state=state)

    return Model(init, apply_stateful, init_state)

"""The model contract: ``Model(init, apply)``.

``init(key) -> params`` (float32, a plain nested dict); ``apply(params, x, *, key=None,
train=False) -> output``. ``key`` feeds dropout when ``train=True``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bpkit.nn.core import Layer


class Model(NamedTuple):
    """A model as a pair of pure functions."""

    init: Callable[[Any], Any]
    apply: Callable[..., jax.Array]


def from_layer(net: Layer, in_shape: tuple, *, prepare: Callable | None = None,
               dtype=jnp.float32) -> Model:
    """A ``Model`` from a stateless layer initialised for per-example ``in_shape``.

    ``prepare(x)`` (optional) reshapes the raw batch before the layer (e.g. ``(B, 40)`` to
    ``(B, 40, 1)``).
    """
    if net.stateful:
        raise ValueError(f"{net.name} is stateful (e.g. contains batch_norm); Model.apply has no "
                         "state argument. Use the layer's init_state/apply directly.")

    def init(key):
        return net.init(key, in_shape, dtype)[0]

    def apply(params, x, *, key=None, train=False):
        if prepare is not None:
            x = prepare(x)
        return net.apply(params, x, key=key, train=train)

    return Model(init, apply)

"""``TrainState``: everything a training step reads and writes, as one pytree."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
    """``step`` (int32 scalar), ``params``, ``opt_state``, ``model_state`` (e.g. BatchNorm
    statistics; ``{}`` when the model has none) and ``key`` (a raw uint32 PRNG key).

    The step's randomness is ``fold_in(key, step)``, a pure function of (seed, step): a run
    resumed from a checkpoint draws the same dropout masks as an uninterrupted run.
    """

    step: Any
    params: Any
    opt_state: Any
    model_state: Any
    key: Any

    @classmethod
    def create(cls, params, optimizer, *, seed: int = 0, model_state=None, key=None
               ) -> "TrainState":
        key = jax.random.PRNGKey(seed) if key is None else key
        return cls(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                   {} if model_state is None else model_state, key)

    def step_key(self):
        """This step's PRNG key: ``fold_in(key, step)``."""
        return jax.random.fold_in(self.key, self.step)

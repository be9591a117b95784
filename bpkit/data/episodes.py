"""Reinforcement-learning "data": the episodes of a pure-JAX environment (bpkit/envs), one
int32 seed per episode. A training batch is ``batch_size`` fresh seeds drawn from ``(seed,
step)``; the held-out episodes are fixed seeds (see ``eval_batches``)."""
from __future__ import annotations

import numpy as np

from bpkit.data.batching import Dataset


def load_env(name: str) -> Dataset:
    """The episode set of environment ``name`` (a key of ``bpkit.envs.ENVS``)."""
    return Dataset(name, "env", sampler=episode_seeds, info={"env": name})


def episode_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` episode seeds ``(n,)`` int32 in [0, 2^31)."""
    return rng.integers(0, 2**31 - 1, n).astype(np.int32)

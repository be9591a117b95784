"""Small MNIST-1D classifiers written in each library, for ``model.name:
tests/models/user_models.py:<factory>`` (tests/models/test_user_models.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bpkit_mlp(in_features: int, num_classes: int, hidden: int = 16):
    """A bpkit Model written by hand: two plain functions."""
    from bpkit.models import Model

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"hidden": {"w": jax.random.normal(k1, (in_features, hidden)) / in_features ** 0.5,
                           "b": jnp.zeros(hidden)},
                "head": {"w": jax.random.normal(k2, (hidden, num_classes)) / hidden ** 0.5,
                         "b": jnp.zeros(num_classes)}}

    def apply(params, x, *, key=None, train=False):
        with jax.named_scope("hidden"):
            h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
        with jax.named_scope("head"):
            return h @ params["head"]["w"] + params["head"]["b"]
    return Model(init, apply)


def linen_mlp(num_classes: int, hidden: int = 16):
    """Flax linen, with BatchNorm (its batch_stats become the model state)."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(hidden)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(num_classes)(nn.tanh(x))
    return MLP()


def nnx_mlp(in_features: int, num_classes: int, seed: int = 0, hidden: int = 16):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
            self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.hidden(x)))
    return MLP(nnx.Rngs(seed))


def equinox_mlp(in_features: int, num_classes: int, seed: int = 0, hidden: int = 16):
    import equinox as eqx
    return eqx.nn.MLP(in_features, num_classes, hidden, depth=1, activation=jnp.tanh,
                      key=jax.random.PRNGKey(seed))


def haiku_mlp(num_classes: int, hidden: int = 16):
    import haiku as hk

    def forward(x):
        return hk.nets.MLP([hidden, num_classes], activation=jnp.tanh)(x)
    return hk.transform(forward)

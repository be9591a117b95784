"""A policy network for reinforcement learning (see bpkit/envs/policy_gradient.py)."""
from __future__ import annotations

from jax.nn import initializers

from bpkit import nn
from bpkit.models.core import Model, from_layer


def policy_mlp(obs_dim: int = 4, num_actions: int = 2, hidden=(64, 64)) -> Model:
    """Observations ``(B, obs_dim)`` -> action logits ``(B, num_actions)``: ``dense -> tanh``
    per hidden width, then a linear head initialised to zero, so that training starts from the
    uniform policy. Params ``dense_i``, ``head``."""
    layers = []
    for i, h in enumerate(hidden):
        layers += [nn.dense(h, name=f"dense_{i}"), nn.tanh(name=f"tanh_{i}")]
    layers.append(nn.dense(num_actions, w_init=initializers.zeros, name="head"))
    return from_layer(nn.sequential(*layers, name="policy_mlp"), (obs_dim,))

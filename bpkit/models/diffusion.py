"""A denoising diffusion probabilistic model (DDPM, Ho et al. 2020) for low-dimensional data:
the noise-prediction network, its training loss and ancestral sampling.

Forward (noising) process over ``T`` steps with variances ``beta_t`` (linear from
``1e-4 * 1000/T`` to ``0.02 * 1000/T``, the DDPM schedule stretched to ``T`` steps),
``alpha_t = 1 - beta_t`` and ``abar_t = prod_{s <= t} alpha_s``::

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,        eps ~ N(0, I)

Training regresses the noise: ``loss = mean |eps - eps_theta(x_t, t)|^2`` over data ``x_0``,
uniform ``t`` in ``0..T-1`` and ``eps``. Sampling runs the reverse chain from ``x_T ~ N(0, I)``::

    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sigma_t z

with the posterior standard deviation ``sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)``
(and no noise at the last step).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bpkit import nn
from bpkit.models.core import Model


class Schedule(NamedTuple):
    """The noise schedule, each ``(T,)`` float32, indexed by ``t = 0..T-1``."""

    beta: jax.Array
    alpha: jax.Array
    alpha_bar: jax.Array
    sigma: jax.Array          # posterior standard deviation of the reverse step


def schedule(num_steps: int) -> Schedule:
    """The linear DDPM schedule stretched to ``num_steps`` steps (see the module docstring)."""
    scale = 1000.0 / num_steps
    beta = jnp.linspace(1e-4 * scale, min(0.02 * scale, 0.999), num_steps, dtype=jnp.float32)
    alpha = 1.0 - beta
    alpha_bar = jnp.cumprod(alpha)
    previous = jnp.concatenate([jnp.ones((1,), jnp.float32), alpha_bar[:-1]])
    sigma = jnp.sqrt(beta * (1.0 - previous) / (1.0 - alpha_bar))
    return Schedule(beta, alpha, alpha_bar, sigma)


def time_embedding(t, dim: int):
    """Sinusoidal features of integer steps ``t (B,)`` -> ``(B, 2 (dim // 2))``: ``sin(t w_k)``
    and ``cos(t w_k)`` for ``dim // 2`` frequencies ``w_k`` from 1 down to 1/1000 (geometric)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]                   # (B, dim / 2)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def ddpm_mlp(data_dim: int = 2, hidden: int = 128, depth: int = 3, time_dim: int = 32,
             num_steps: int = 100) -> Model:
    """The noise predictor ``eps_theta``: ``(x_t (B, data_dim), t (B,) int) -> (B, data_dim)``::

        e = dense(time_embedding(t))                         (B, hidden), shared by all layers
        h = silu(dense_0(x_t) + e)
        h = silu(dense_i(h) + e)  for 0 < i < depth
        eps = dense_out(h)

    ``num_steps`` is the diffusion's ``T`` (it sizes the time embedding's range and is read
    by the task's loss and sampler). Params ``time``, ``dense_{i}``, ``out`` (zero-initialised
    output: the untrained model predicts no noise).
    """
    time = nn.dense(hidden, name="time")
    layers = [nn.dense(hidden, name=f"dense_{i}") for i in range(depth)]
    out = nn.dense(data_dim, w_init=jax.nn.initializers.zeros, name="out")

    def init(key, dtype=jnp.float32):
        keys = jax.random.split(key, depth + 2)
        params = {"time": time.init(keys[0], (2 * (time_dim // 2),), dtype)[0],
                  "out": out.init(keys[1], (hidden,), dtype)[0]}
        for i, layer in enumerate(layers):
            params[layer.name] = layer.init(keys[2 + i], (data_dim if i == 0 else hidden,),
                                            dtype)[0]
        return params

    def apply(params, inputs, *, key=None, train=False):
        x, t = inputs
        e = time.apply(params["time"], time_embedding(t, time_dim))      # (B, hidden)
        h = x
        for layer in layers:
            h = jax.nn.silu(layer.apply(params[layer.name], h) + e)        # (B, hidden)
        return out.apply(params["out"], h)                                  # (B, data_dim)

    return Model(init, apply)


def noise_prediction_loss(model: Model, params, x0, key, sched: Schedule):
    """Per-example ``mean_d (eps - eps_theta(x_t, t))^2`` for data ``x0 (B, D)``: ``(B,)``."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.beta.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    ab = sched.alpha_bar[t][:, None].astype(x0.dtype)                       # (B, 1)
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps
    return jnp.mean(jnp.square(eps - model.apply(params, (x_t, t))), axis=-1)


def sample(model: Model, params, key, n: int, data_dim: int, sched: Schedule):
    """``n`` samples ``(n, data_dim)`` by the reverse chain (one ``lax.scan`` over ``T``)."""
    k_init, k_steps = jax.random.split(key)
    num_steps = sched.beta.shape[0]

    def step(x, inputs):
        t, k = inputs
        eps = model.apply(params, (x, jnp.full((n,), t, jnp.int32)))
        mean = (x - sched.beta[t] / jnp.sqrt(1.0 - sched.alpha_bar[t]) * eps) \
            / jnp.sqrt(sched.alpha[t])
        noise = jnp.where(t > 0, sched.sigma[t], 0.0) * jax.random.normal(k, x.shape, x.dtype)
        return mean + noise, None

    ts = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    x, _ = lax.scan(step, jax.random.normal(k_init, (n, data_dim), jnp.float32),
                    (ts, jax.random.split(k_steps, num_steps)))
    return x

"""Recurrent layers over time with ``lax.scan``: vanilla RNN, GRU, LSTM.

Each maps ``x (B, T, F)`` to the hidden states ``(B, T, H)`` from a zero initial state
(``return_sequences=False``: the last hidden state ``(B, H)``). Gate weights are stored fused:
``w_x (F, G H)``, ``w_h (H, G H)``, ``b (G H,)`` with ``G`` gates in the documented order.

The input projection ``x_t W_x + b`` is computed inside each step, not hoisted out of the loop
as one ``(T B, F) @ (F, G H)`` product: the hoisted form stores a ``(T, B, G H)`` array and its
cotangent (``G H / F`` times the input's size), which cost more than the larger product saves.
Measured (2-core CPU, ``B`` = 256, ``T`` = 40, ``H`` = 128, the whole train step, per step /
hoisted): LSTM 0.65-0.90 at ``F`` = 1 (JAX 0.10.2; 0.85 on 0.11.2 and 0.12), 0.88-0.96 at
``F`` = 8-128; GRU 0.74-0.96 at ``F`` = 1, 0.88-0.96 at ``F`` = 8-128; XLA temporaries 0.48x
(LSTM) and 0.47x (GRU) at ``F`` = 1 (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.nn import initializers

from bpkit.nn.core import Layer, shape_error


def _lead(x, v):
    return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def _recurrent(name: str, hidden: int, gates: int, cell: Callable, carry_init: Callable,
               return_sequences: bool, forget_bias: float = 0.0) -> Layer:
    def init(key, in_shape, dtype=jnp.float32):
        if len(in_shape) != 2:
            raise shape_error(name, f"expects (T, F) per example, got {tuple(in_shape)}; "
                              "reshape a sequence of scalars (B, T) to (B, T, 1).")
        f = in_shape[-1]
        kx, kh = jax.random.split(key)
        b = jnp.zeros((gates * hidden,), dtype)
        if forget_bias:
            b = b.at[hidden:2 * hidden].set(forget_bias)
        params = {"w_x": initializers.glorot_uniform()(kx, (f, gates * hidden), dtype),
                  "w_h": initializers.orthogonal()(kh, (hidden, gates * hidden), dtype),
                  "b": b}
        out = (in_shape[0], hidden) if return_sequences else (hidden,)
        return params, out

    def forward(params, x, *, key=None, train=False):
        def step(carry, x_t):  # x_t (B, F)
            x_proj = jnp.matmul(x_t, params["w_x"])  # (B, G H): the input part of every gate
            x_proj = x_proj + _lead(x_proj, params["b"])
            carry = cell(params["w_h"], carry, x_proj)
            h = carry[0] if isinstance(carry, tuple) else carry
            return carry, (h if return_sequences else None)

        carry0 = carry_init(x.shape[0], x.dtype)
        last, hs = lax.scan(step, carry0, jnp.swapaxes(x, 0, 1))  # over x (T, B, F)
        if return_sequences:
            return jnp.swapaxes(hs, 0, 1)  # (B, T, H)
        return last[0] if isinstance(last, tuple) else last  # (B, H)

    return Layer(name, init, forward)


def rnn(hidden: int, *, activation: Callable = jnp.tanh, return_sequences: bool = True,
        name: str = "rnn") -> Layer:
    """Elman RNN: ``h_t = tanh(x_t W_x + h_{t-1} W_h + b)``."""
    def cell(w_h, h, xp):
        return activation(xp + jnp.matmul(h, w_h))

    return _recurrent(name, hidden, 1, cell,
                      lambda b, dt: jnp.zeros((b, hidden), dt), return_sequences)


def gru(hidden: int, *, return_sequences: bool = True, name: str = "gru") -> Layer:
    """GRU (gate order r, z, n)::

        r = sigmoid(x W_xr + h W_hr + b_r)      z = sigmoid(x W_xz + h W_hz + b_z)
        n = tanh(x W_xn + b_n + r * (h W_hn))
        h' = (1 - z) * n + z * h
    """
    def cell(w_h, h, xp):
        xr, xz, xn = jnp.split(xp, 3, axis=-1)  # (B, H) each
        hr, hz, hn = jnp.split(jnp.matmul(h, w_h), 3, axis=-1)
        r = lax.logistic(xr + hr)
        z = lax.logistic(xz + hz)
        n = jnp.tanh(xn + r * hn)
        return (1.0 - z) * n + z * h

    return _recurrent(name, hidden, 3, cell,
                      lambda b, dt: jnp.zeros((b, hidden), dt), return_sequences)


def lstm(hidden: int, *, return_sequences: bool = True, forget_bias: float = 1.0,
         name: str = "lstm") -> Layer:
    """LSTM (gate order i, f, g, o; the forget bias starts at ``forget_bias``)::

        i, f, o = sigmoid(.)      g = tanh(.)      each of x W_x + h W_h + b
        c' = f * c + i * g        h' = o * tanh(c')
    """
    def cell(w_h, carry, xp):
        h, c = carry
        i, f, g, o = jnp.split(xp + jnp.matmul(h, w_h), 4, axis=-1)  # (B, H) each
        c = lax.logistic(f) * c + lax.logistic(i) * jnp.tanh(g)
        h = lax.logistic(o) * jnp.tanh(c)
        return (h, c)

    zeros = lambda b, dt: (jnp.zeros((b, hidden), dt), jnp.zeros((b, hidden), dt))  # noqa: E731
    return _recurrent(name, hidden, 4, cell, zeros, return_sequences, forget_bias)

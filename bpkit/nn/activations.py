"""Elementwise activations, written from ``lax`` primitives (no ``custom_jvp``), each with
its formula. Derivatives at kinks follow ``jax.nn`` (relu'(0) = 0)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``; derivative ``1[x > 0]``."""
    return jnp.where(x > 0, x, jnp.zeros((), x.dtype))


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """``x`` if ``x >= 0`` else ``negative_slope * x``."""
    return jnp.where(x >= 0, x, negative_slope * x)


def elu(x: jax.Array, alpha: float = 1.0) -> jax.Array:
    """``x`` if ``x > 0`` else ``alpha (exp(x) - 1)`` (expm1 of ``min(x, 0)``: no overflow in
    the unused branch, so no ``0 * inf`` in the backward pass)."""
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, jnp.zeros((), x.dtype))))


def gelu(x: jax.Array) -> jax.Array:
    """Tanh approximation: ``x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def gelu_exact(x: jax.Array) -> jax.Array:
    """``x Phi(x) = x/2 (1 + erf(x / sqrt 2))``."""
    return 0.5 * x * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))


def sigmoid(x: jax.Array) -> jax.Array:
    """``1 / (1 + exp(-x))``."""
    return lax.logistic(x)


def silu(x: jax.Array) -> jax.Array:
    """``x sigmoid(x)`` (swish)."""
    return x * lax.logistic(x)


def tanh(x: jax.Array) -> jax.Array:
    """``tanh(x)``."""
    return jnp.tanh(x)


def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))`` (stable for large ``|x|``; the
    derivative at 0 is 1/2 + 0 by JAX's tie rules for ``max`` and ``abs``)."""
    return jnp.maximum(x, jnp.zeros((), x.dtype)) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def identity(x: jax.Array) -> jax.Array:
    """``x``."""
    return x

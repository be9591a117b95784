"""Losses (per example; average them yourself) and metrics.

Conventions: ``softmax_cross_entropy`` reduces the class axis only (logits ``(..., C)`` ->
``(...)``, so a language model's ``(B, T, C)`` gives ``(B, T)``); the other losses reduce every
axis but the first (``(B, ...)`` -> ``(B,)``; a ``(B,)`` input stays elementwise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bpkit import ops


def _per_example_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _check_same_shape(who, a, b):
    if a.shape != b.shape:
        raise ValueError(f"{who}: prediction shape {a.shape} differs from target shape {b.shape}; "
                         "reshape one of them (no implicit broadcasting).")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                          *, fused: bool = True) -> jax.Array:
    """``-sum_c q_c log softmax(logits)_c`` with ``q = (1 - a) onehot(labels) + a / C``.

    logits ``(..., C)``, integer labels ``(...)`` -> ``(...)``. ``fused=True`` uses
    ``bpkit.ops.softmax_cross_entropy`` (backward ``softmax - q`` by hand).
    """
    if fused:
        return ops.softmax_cross_entropy(logits, labels, label_smoothing)
    return ops.reference.softmax_cross_entropy(logits, labels, label_smoothing)


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)) = max(z, 0) - z t + log1p(exp(-|z|))``,
    averaged over non-batch axes. Targets in ``[0, 1]``, same shape and dtype as logits."""
    _check_same_shape("binary_cross_entropy_with_logits", logits, targets)
    z = logits
    per_elem = (jnp.maximum(z, jnp.zeros((), z.dtype)) - z * targets
                + jnp.log1p(jnp.exp(-jnp.abs(z))))
    return _per_example_mean(per_elem)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``mean((pred - target)^2)`` over non-batch axes: ``(B, ...) -> (B,)``."""
    _check_same_shape("mse", pred, target)
    return _per_example_mean(jnp.square(pred - target))


def huber(pred: jax.Array, target: jax.Array, delta: float = 1.0) -> jax.Array:
    """``r^2 / 2`` if ``|r| <= delta`` else ``delta (|r| - delta / 2)``, ``r = pred - target``,
    averaged over non-batch axes."""
    _check_same_shape("huber", pred, target)
    r = jnp.abs(pred - target)
    quad = jnp.minimum(r, jnp.full((), delta, r.dtype))
    return _per_example_mean(0.5 * quad * quad + delta * (r - quad))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of ``argmax(logits, -1) == labels`` over all positions (a scalar, float32)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"accuracy: logits {logits.shape} and labels {labels.shape} must agree "
                         "except for the class axis.")
    predicted = jnp.argmax(logits, axis=-1).astype(labels.dtype)
    return jnp.mean((predicted == labels).astype(jnp.float32))

"""Fused softmax cross-entropy with a hand-derived backward pass.

Forward (per row, logits ``z`` of length ``C``, integer label ``y``, smoothing ``a``)::

    lse  = log sum_c exp(z_c)                      (computed as m + log sum exp(z - m), m = max z)
    q    = (1 - a) onehot(y) + a / C               (the target distribution)
    loss = lse - sum_c q_c z_c                     (= -sum_c q_c log softmax(z)_c, as sum q = 1)

Backward. With ``p = softmax(z) = exp(z - lse)`` and ``d lse / d z = p``::

    d loss / d z = p - q
    dz = g * (p - q)                               (g: the cotangent of the row's loss)

The forward saves ``p`` (``(..., C)``, computed anyway as ``exp(z - m) / sum exp(z - m)``) and
the labels; the logits are not saved, so memory is the same as keeping the logits alive. The
backward is then one elementwise pass. Recomputing ``p = exp(z - lse)`` from a saved per-row
``lse`` instead (as ``bpkit.ops.attention`` does, where ``p`` is ``T x T``) costs a second
``exp`` over ``(..., C)``, which on XLA's CPU backend made the fused op 1.1x slower than the
unfused reference; saving ``p`` makes it 0.64-1.05x (docs/benchmarks.md). Labels are integers
and get no cotangent.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_cross_entropy(logits, labels, label_smoothing):
    return softmax_cross_entropy_forward(logits, labels, label_smoothing)[0]


def softmax_cross_entropy_forward(logits, labels, label_smoothing):
    """Losses ``(...)`` and the saved values ``(probs, labels)``."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(denom))[..., 0]  # (...)
    probs = e / denom  # p, saved for the backward: (..., C)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]  # z_y, (...)
    if label_smoothing:
        target_dot_z = ((1.0 - label_smoothing) * picked
                        + label_smoothing * jnp.mean(logits, axis=-1))
    else:
        target_dot_z = picked
    return lse - target_dot_z, (probs, labels)


def softmax_cross_entropy_backward(label_smoothing, saved, g):
    """``dz = g * (softmax(z) - q)`` from the saved ``(probs, labels)``."""
    probs, labels = saved
    num_classes = probs.shape[-1]
    target = jax.nn.one_hot(labels, num_classes, dtype=probs.dtype)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
    return g[..., None] * (probs - target), None


_softmax_cross_entropy.defvjp(softmax_cross_entropy_forward, softmax_cross_entropy_backward)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, fused (see the module docstring for the derivation).

    Args:
      logits: ``(..., C)`` floating point.
      labels: ``(...)`` integers in ``[0, C)``, indexing the last axis of ``logits``.
      label_smoothing: ``a`` in ``[0, 1)``; the target is ``(1 - a) onehot(y) + a / C``.

    Returns:
      ``(...)`` losses, ``lse(z) - <q, z>``, in the dtype of ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"softmax_cross_entropy: logits have shape {logits.shape} and labels {labels.shape}; "
            "labels must have the shape of logits without its last (class) axis.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"softmax_cross_entropy: labels must be integers, got {labels.dtype}. "
                        "Pass class indices, not one-hot vectors.")
    return _softmax_cross_entropy(logits, labels, float(label_smoothing))

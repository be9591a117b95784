"""LoRA: low-rank adapters on dense (projection) layers, and their merge for inference.

A dense layer ``y = x W + b`` (``W (in, out)``) wrapped by ``lora(dense, rank=r, alpha=a)``
computes

    y = x W + b + (a / r) (x A) B          A (in, r) ~ N(0, 1/in),  B (r, out) = 0

so at initialisation it is exactly the wrapped layer (``B = 0``), and training only ``A`` and
``B`` (``optimizer.trainable: ["*lora_*"]``; the base ``W, b`` frozen) moves the weights
within a rank-``r`` subspace with ``r (in + out)`` parameters instead of ``in * out``
(Hu et al., 2021). ``(x A) B`` is computed instead of ``x (A B)``: two thin matmuls.

Params ``{w, b, lora_a, lora_b}``; the base parameters are initialised from the same key as
the unwrapped layer's, so a model with adapters starts from the same weights as one without.
``lora_merge(params, alpha)`` folds every adapter into its weight, ``W + (a / r) A B``, giving
the parameters of the model without adapters (one matmul per layer at inference);
``lora_split``/``lora_join`` separate the adapters from the base parameters (loading a
pre-trained checkpoint into a model with adapters).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bpkit.nn.core import Layer, shape_error

ADAPTER_KEYS = ("lora_a", "lora_b")


def lora(base: Layer, rank: int, alpha: float = 8.0) -> Layer:
    """``base`` (an ``nn.dense``) plus a rank-``rank`` adapter scaled by ``alpha / rank``.

    x ``(..., in)`` -> ``(..., out)``; params ``w (in, out)``, ``b (out,)`` (the base's),
    ``lora_a (in, rank)`` (normal, variance ``1/in``), ``lora_b (rank, out)`` (zeros).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora: rank must be a positive integer, got {rank!r}.")
    scale = alpha / rank

    def init(key, in_shape, dtype=jnp.float32):
        params, out_shape = base.init(key, in_shape, dtype)
        if set(params) - {"w", "b"} or jnp.ndim(params.get("w")) != 2:
            raise shape_error(base.name, "lora adapts dense layers (params w (in, out) and b); "
                              f"this layer has {sorted(params)}.")
        d_in, d_out = params["w"].shape
        key_a = jax.random.fold_in(key, 1)  # the base keeps `key`: same weights as unwrapped
        params = dict(params,
                      lora_a=jax.random.normal(key_a, (d_in, rank), dtype) / jnp.sqrt(d_in),
                      lora_b=jnp.zeros((rank, d_out), dtype))
        return params, out_shape

    def forward(params, x, *, key=None, train=False):
        base_params = {k: v for k, v in params.items() if k not in ADAPTER_KEYS}
        y = base.forward(base_params, x, key=key, train=train)  # (..., out)
        low = jnp.matmul(x, params["lora_a"])  # (..., r)
        return y + scale * jnp.matmul(low, params["lora_b"])

    return Layer(base.name, init, forward)


def _is_adapted(node) -> bool:
    return isinstance(node, dict) and all(k in node for k in ADAPTER_KEYS)


def lora_merge(params, alpha: float = 8.0):
    """``params`` with every adapter folded in: ``w <- w + (alpha / r) lora_a @ lora_b`` and
    the ``lora_*`` leaves dropped (``r`` read from ``lora_a``'s shape). The result is the
    parameter tree of the same model built without adapters; ``alpha`` must be the one the
    adapters were trained with."""
    if _is_adapted(params):
        a, b = params["lora_a"], params["lora_b"]
        merged = {k: v for k, v in params.items() if k not in ADAPTER_KEYS}
        merged["w"] = params["w"] + (alpha / a.shape[1]) * jnp.matmul(a, b)
        return merged
    if isinstance(params, dict):
        return {k: lora_merge(v, alpha) for k, v in params.items()}
    return params


def lora_split(params):
    """``(base, adapters)``: ``params`` without its ``lora_*`` leaves, and a tree of only
    those (``{}`` when there are none)."""
    if not isinstance(params, dict):
        return params, {}
    base, adapters = {}, {}
    for k, v in params.items():
        if k in ADAPTER_KEYS:
            adapters[k] = v
            continue
        base[k], sub = lora_split(v)
        if sub:
            adapters[k] = sub
    return base, adapters


def lora_join(base, adapters):
    """The inverse of ``lora_split``: ``adapters`` merged back into ``base``."""
    if not adapters:
        return base
    out = dict(base)
    for k, v in adapters.items():
        out[k] = v if k in ADAPTER_KEYS else lora_join(base[k], v)
    return out

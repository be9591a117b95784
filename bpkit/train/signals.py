"""Backward signals in training: a second jitted function, called every ``diagnostics.every``
steps on the step's own batch, parameters and key (so it costs nothing on the other steps;
the train step itself is untouched).

With ``engine="bpkit"`` it gives, per named layer, ``||dL/d output||`` (the error signal
arriving at the layer) and ``||dL/d params||``. With ``engine="jax"`` only parameter-gradient
norms exist: ``jax.grad`` does not expose the cotangents of intermediate values.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from bpkit.diagnostics import backward_signals, layer_names, param_grad_norms, signal_warnings
from bpkit.train.step import value_and_grad_for, with_compute_dtype


def make_signals_fn(loss_fn: Callable, *, engine: str = "bpkit", has_aux: bool = True,
                    compute_dtype=None, jit: bool = True, with_grads: bool = False) -> Callable:
    """``signals(params, batch, key) -> {layer: {"activation_grad_norm", "param_grad_norm"}}``
    (device scalars; layers in depth order, nested ones as ``block_0/attn``; with
    ``engine="jax"`` only ``param_grad_norm``, for the layers that own parameters).
    ``with_grads``: ``(signals, gradient)``, the parameter gradient it computed on the way
    (for histograms)."""
    f = with_compute_dtype(loss_fn, compute_dtype, has_aux)

    def scalar_loss(params, batch, key):
        return f(params, batch, key)[0] if has_aux else f(params, batch, key)

    names: list[str] = []  # depth order, recorded at trace time (jit outputs sort dicts)

    if engine == "bpkit":
        run = backward_signals(scalar_loss)

        def signals(params, batch, key):
            _, grads, sig = run(params, batch, key)
            names[:] = list(sig)
            return [{"activation_grad_norm": s.activation_grad_norm,
                     "param_grad_norm": s.param_grad_norm} for s in sig.values()], grads
    else:
        vg = value_and_grad_for(engine)(scalar_loss)

        def signals(params, batch, key):
            layers = layer_names(scalar_loss)(params, batch, key)  # trace only: names, order
            _, grads = vg(params, batch, key)
            norms = param_grad_norms(grads, layers)
            names[:] = [n for n in layers if n in norms]
            return [{"param_grad_norm": norms[n]} for n in names], grads

    def outputs(params, batch, key):  # the gradient leaves the jitted function only if asked
        values, grads = signals(params, batch, key)
        return (values, grads) if with_grads else (values, None)

    compiled = jax.jit(outputs) if jit else outputs

    def ordered(params, batch, key):
        values, grads = compiled(params, batch, key)
        return (dict(zip(names, values)), grads) if with_grads else dict(zip(names, values))

    ordered.compiled = compiled
    return ordered




def signals_to_host(signals: dict) -> dict[str, dict[str, Any]]:
    """Plain floats for metrics.jsonl; NaN (a layer without parameters) becomes ``None``."""
    out = {}
    for name, d in signals.items():
        rec = {"activation_grad_norm": None, "param_grad_norm": None}
        for k, v in d.items():
            v = float(np.asarray(v))
            rec[k] = None if math.isnan(v) and k == "param_grad_norm" else v
        out[name] = rec
    return out


def top_level(signals: dict) -> dict:
    """The top-level layers (no ``/`` in the name), in depth order."""
    return {k: v for k, v in signals.items() if "/" not in k}


def warnings_for(host_signals: dict, *, vanish_ratio: float, explode_ratio: float) -> list[str]:
    """``signal_warnings`` on the top-level layers: activation-gradient norms when present
    (engine bpkit), parameter-gradient norms otherwise (engine jax)."""
    top = top_level(host_signals)
    key = ("activation_grad_norm" if any(v.get("activation_grad_norm") is not None
                                         for v in top.values()) else "param_grad_norm")
    norms = {k: v[key] for k, v in top.items() if v.get(key) is not None}
    return signal_warnings(norms, vanish_ratio=vanish_ratio, explode_ratio=explode_ratio)

"""Backward signals and layer health in training: a second jitted function, called every
``diagnostics.every`` steps on the step's own batch, parameters, key and optimizer state (so
it costs nothing on the other steps; the train step itself is untouched: the same compiled
program with diagnostics on or off).

With ``engine="bpkit"`` it gives, per named layer, ``||dL/d output||`` (the error signal
arriving at the layer) and ``||dL/d params||``, and with ``diagnostics.health`` (default) the
layer's parameter norm, the norm of the update the optimizer makes from these gradients and
its ratio to the parameters, the activations' mean and standard deviation and the fraction of
dead units (``bpkit.diagnostics.health``). With ``engine="jax"`` only the parameter-side
quantities exist: ``jax.grad`` does not expose the cotangents of intermediate values.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax

from bpkit import sharding
from bpkit.diagnostics import backward_signals, layer_names, param_grad_norms, signal_warnings
from bpkit.diagnostics.health import health_warnings, layer_health, update_health
from bpkit.train.step import value_and_grad_for, with_compute_dtype


def make_signals_fn(loss_fn: Callable, *, engine: str = "bpkit", has_aux: bool = True,
                    compute_dtype=None, jit: bool = True, optimizer=None,
                    health: bool = False, with_grads: bool = False) -> Callable:
    """``signals(params, batch, key, opt_state=None) -> {layer: {"activation_grad_norm",
    "param_grad_norm", ...}}`` (device scalars; layers in depth order, nested ones as
    ``block_0/attn``; with ``engine="jax"`` only ``param_grad_norm``, for the layers that own
    parameters). ``with_grads``: ``(signals, gradient)``, the parameter gradient it computed
    on the way (for histograms).

    ``health=True`` adds per-layer health (``bpkit.diagnostics.health``): ``param_norm``, and
    with engine bpkit ``act_mean``, ``act_std``, ``dead_fraction``; with an ``optimizer`` and
    the step's ``opt_state``, ``update_norm`` and ``update_ratio`` of the update the train step
    applies to these same parameters and gradients (``optimizer.update`` is pure; with
    ``optimizer.dp`` it is the update the unclipped, noiseless gradient would make)."""
    f = with_compute_dtype(loss_fn, compute_dtype, has_aux)

    def scalar_loss(params, batch, key):
        return f(params, batch, key)[0] if has_aux else f(params, batch, key)

    names: list[str] = []  # depth order, recorded at trace time (jit outputs sort dicts)

    def with_updates(records, params, grads, opt_state):
        if health and optimizer is not None and opt_state is not None:
            updates, _ = optimizer.update(grads, opt_state, params)
            for name, extra in update_health(params, updates, names).items():
                records[names.index(name)].update(extra)
        return records

    if engine == "bpkit" and health:
        run_health = layer_health(scalar_loss)

        def signals(params, batch, key, opt_state=None):
            _, grads, h = run_health(params, batch, key)
            names[:] = list(h)
            return with_updates([dict(v._asdict()) for v in h.values()], params, grads,
                                opt_state), grads
    elif engine == "bpkit":
        run = backward_signals(scalar_loss)

        def signals(params, batch, key, opt_state=None):
            _, grads, sig = run(params, batch, key)
            names[:] = list(sig)
            return [{"activation_grad_norm": s.activation_grad_norm,
                     "param_grad_norm": s.param_grad_norm} for s in sig.values()], grads
    else:
        vg = value_and_grad_for(engine)(scalar_loss)

        def signals(params, batch, key, opt_state=None):
            layers = layer_names(scalar_loss)(params, batch, key)  # trace only: names, order
            _, grads = vg(params, batch, key)
            norms = param_grad_norms(grads, layers)
            names[:] = [n for n in layers if n in norms]
            records = [{"param_grad_norm": norms[n]} for n in names]
            if health:
                pnorms = param_grad_norms(params, names)
                for n, r in zip(names, records):
                    r["param_norm"] = pnorms[n]
            return with_updates(records, params, grads, opt_state), grads

    def outputs(params, batch, key, opt_state=None):  # the gradient leaves only if asked
        values, grads = signals(params, batch, key, opt_state)
        return (values, grads) if with_grads else (values, None)

    compiled = jax.jit(outputs) if jit else outputs

    def ordered(params, batch, key, opt_state=None):
        values, grads = compiled(params, batch, key, opt_state)
        return (dict(zip(names, values)), grads) if with_grads else dict(zip(names, values))

    ordered.compiled = compiled
    return ordered


def signals_to_host(signals: dict) -> dict[str, dict[str, Any]]:
    """Plain floats for metrics.jsonl; NaN (a quantity that does not apply to the layer, such
    as a parameter norm of a layer without parameters) becomes ``None``. ``update_ratio`` is
    logged as ``update_ratio_log10``. The values are global: the signals function runs on the
    global batch, and every process reads the same numbers (``sharding.host_value``)."""
    out = {}
    for name, d in signals.items():
        rec: dict[str, Any] = {"activation_grad_norm": None, "param_grad_norm": None}
        for k, v in d.items():
            v = float(sharding.host_value(v))
            if k == "update_ratio":
                k, v = "update_ratio_log10", (math.log10(v) if v > 0 and math.isfinite(v)
                                              else float("nan"))
            rec[k] = None if math.isnan(v) and k != "activation_grad_norm" else v
        out[name] = rec
    return out


def top_level(signals: dict) -> dict:
    """The top-level layers (no ``/`` in the name), in depth order."""
    return {k: v for k, v in signals.items() if "/" not in k}


def health_warnings_for(host_signals: dict, diagnostics) -> list[str]:
    """``health_warnings`` on the top-level layers with ``diagnostics``' thresholds."""
    top = {k: dict(v, update_ratio=10 ** v["update_ratio_log10"]
                   if v.get("update_ratio_log10") is not None else None)
           for k, v in top_level(host_signals).items()}
    return health_warnings(top, dead_fraction=diagnostics.dead_fraction,
                           update_ratio_min=diagnostics.update_ratio_min,
                           update_ratio_max=diagnostics.update_ratio_max)


def warnings_for(host_signals: dict, *, vanish_ratio: float, explode_ratio: float) -> list[str]:
    """``signal_warnings`` on the top-level layers: activation-gradient norms when present
    (engine bpkit), parameter-gradient norms otherwise (engine jax)."""
    top = top_level(host_signals)
    key = ("activation_grad_norm" if any(v.get("activation_grad_norm") is not None
                                         for v in top.values()) else "param_grad_norm")
    norms = {k: v[key] for k, v in top.items() if v.get(key) is not None}
    return signal_warnings(norms, vanish_ratio=vanish_ratio, explode_ratio=explode_ratio)


class SignalReporter:
    """Console warnings from logged signals: one line per kind (vanishes / explodes / not
    finite / dead units / fast or slow updates) naming the layers new to it, the first in
    full and the others by name; each layer is warned about once per kind."""

    KINDS = ("vanishes", "explodes", "not finite", "are dead", "moves fast", "barely moves")

    def __init__(self, diagnostics, lr_fraction: Callable[[int], float] | None = None):
        self.diagnostics = diagnostics
        self.lr_fraction = lr_fraction   # update -> learning rate / peak learning rate
        self.warned: set[tuple[str, str]] = set()

    def lines(self, step: int, host_signals: dict) -> list[str]:
        """Warnings for the signals logged before update ``step`` (1-based)."""
        g = self.diagnostics
        msgs = warnings_for(host_signals, vanish_ratio=g.vanish_ratio,
                            explode_ratio=g.explode_ratio)
        if g.health:
            # Updates are small by design during warmup and at the end of a decay: the
            # update-ratio warnings only apply at >= 10% of the peak learning rate.
            steady = self.lr_fraction is None or self.lr_fraction(step) >= 0.1
            msgs += [m for m in health_warnings_for(host_signals, g)
                     if steady or "are dead" in m]
        new: dict[str, list[tuple[str, str]]] = {}
        for msg in msgs:
            layer = msg.split("'")[1]
            kind = next((k for k in self.KINDS if k in msg), msg)
            if (layer, kind) not in self.warned:
                self.warned.add((layer, kind))
                new.setdefault(kind, []).append((layer, msg))
        out = []
        for kind, items in new.items():
            line = f"warning: step {step}: {items[0][1]}"
            others = [layer for layer, _ in items[1:]]
            if others:
                shown = ", ".join(others[:6]) + (f", ... ({len(others) - 6} more)"
                                                 if len(others) > 6 else "")
                line += f" Also {kind} at {len(others)} more layers: {shown}."
            out.append(line)
        return out

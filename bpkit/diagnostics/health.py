"""Per-layer training health: what each named layer's parameters, activations and backward
signals look like, and warnings when they look wrong.

``layer_health(loss)(params, batch, ...) -> (value, grads, {layer: LayerHealth})`` runs one
forward and backward pass under an equation observer (``bpkit.engine.core.observing``) and
gives, per ``jax.named_scope`` layer (named as ``backward_signals`` names them):

* ``activation_grad_norm`` / ``param_grad_norm``: as ``backward_signals``;
* ``param_norm``: ``||params||`` of the layer's parameter leaves (NaN for a layer without);
* ``act_mean`` / ``act_std``: mean and standard deviation of the layer's output over the batch;
* ``dead_fraction``: the fraction of the layer's input units (last axis) whose backward signal
  *through the layer* is exactly zero for every example of the batch: for a ReLU, units that
  are off for the whole batch and so learn nothing (NaN when the layer has no float input).

``update_health(params, updates, names)`` adds ``update_norm`` and ``update_ratio``
(``||update|| / ||params||``; Karpathy's rule of thumb is ~1e-3: much lower learns slowly,
much higher is unstable). ``health_warnings`` turns them into sentences with the thresholds of
``diagnostics.dead_fraction`` and ``diagnostics.update_ratio_min``/``_max``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from bpkit.diagnostics.signals import _layers, layer_outputs
from bpkit.engine import api, compat, core
from bpkit.nn.core import path_str


class LayerHealth(NamedTuple):
    """Per-layer health (float32 scalars; NaN where a quantity does not apply)."""

    activation_grad_norm: jax.Array
    param_grad_norm: jax.Array
    param_norm: jax.Array
    act_mean: jax.Array
    act_std: jax.Array
    dead_fraction: jax.Array


_NAN = float("nan")


def _f32(x):
    return x.astype(jnp.float32)


def _norm(leaves) -> jax.Array:
    sq = [jnp.sum(jnp.square(_f32(g))) for g in leaves]
    return jnp.sqrt(sum(sq)) if sq else jnp.asarray(_NAN, jnp.float32)


def _in_scope(eqn_scope: str, scope: str) -> bool:
    return eqn_scope == scope or eqn_scope.startswith(scope + "/")


def layer_inputs(jaxpr, scopes: Sequence[str], exclude=()) -> dict[str, object]:
    """Each scope's main input: the largest float variable that an equation inside the scope
    reads and that is defined outside it (a function input or another layer's value), not
    one of ``exclude`` (the parameters)."""
    exclude = set(exclude)
    defined = {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if not isinstance(v, compat.DropVar):
                defined[v] = compat.name_stack(eqn)
    out: dict[str, object] = {}
    for scope in scopes:
        best = None
        for eqn in jaxpr.eqns:
            if not _in_scope(compat.name_stack(eqn), scope):
                continue
            for v in eqn.invars:
                if not isinstance(v, compat.Var) or not compat.is_inexact(v.aval):
                    continue
                if v in exclude or v in defined and _in_scope(defined[v], scope):
                    continue
                if len(v.aval.shape) >= 1 and (best is None or v.aval.size > best.aval.size):
                    best = v
        if best is not None:
            out[scope] = best
    return out


class _HealthObserver:
    """Sees the top-level equations (not those inside calls): the forward values of the
    layers' outputs, their cotangents, and the cotangents each layer sends to its input."""

    def __init__(self, jaxpr, outputs: dict, inputs: dict):
        self.out_scopes: dict = {}
        for scope, v in outputs.items():
            self.out_scopes.setdefault(v, []).append(scope)
        self.inputs = inputs                   # scope -> input var
        self.in_scopes: dict = {}
        for scope, v in inputs.items():
            self.in_scopes.setdefault(v, []).append(scope)
        self.depth = 0
        self.values: dict[str, jax.Array] = {}     # scope -> output value
        self.grads: dict[str, jax.Array] = {}      # scope -> output cotangent
        self.to_input: dict[str, jax.Array] = {}   # scope -> cotangent sent to its input

    @contextlib.contextmanager
    def nested(self, eqn, backward: bool):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def forward(self, eqn, invals, outs):
        if self.depth:
            return
        for v, x in zip(eqn.outvars, outs):
            for scope in self.out_scopes.get(v, ()):
                self.values[scope] = x

    def backward(self, eqn, invals, outs, cts_out, cts_in):
        if self.depth:
            return
        for v, ct in zip(eqn.outvars, cts_out):
            for scope in self.out_scopes.get(v, ()):
                if ct is not None:
                    self.grads[scope] = ct
        eqn_scope = compat.name_stack(eqn)
        for v, ct in zip(eqn.invars, cts_in):
            if ct is None:
                continue
            for scope in self.in_scopes.get(v, ()):
                if _in_scope(eqn_scope, scope):
                    prev = self.to_input.get(scope)
                    self.to_input[scope] = ct if prev is None else prev + ct

    def fork(self, backward_only: bool):
        return None


def _dead_fraction(ct) -> jax.Array:
    """Fraction of the last axis whose entries are exactly zero over all other axes."""
    if ct is None:
        return jnp.asarray(_NAN, jnp.float32)
    alive = jnp.any(ct != 0, axis=tuple(range(ct.ndim - 1)))
    return 1.0 - jnp.mean(alive.astype(jnp.float32))


def layer_health(fun: Callable, argnums: int = 0) -> Callable:
    """``layer_health(loss)(params, *rest) -> (value, grads, {layer: LayerHealth})``; ``value``
    and ``grads`` are ``bpkit.value_and_grad(loss, argnums)``'s (see the module docstring)."""
    def wrapped(*args, **kwargs):
        flat_args, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        flat_args = [compat.as_array(x) for x in flat_args]
        lo, hi = api._leaf_spans(args)[argnums]
        traced = core.trace(fun, flat_args, in_tree)
        layers = _layers(traced.jaxpr, args[argnums])
        taps = layer_outputs(traced.jaxpr)
        outputs = {scope: taps[scope] for _, scope in layers}
        inputs = layer_inputs(traced.jaxpr, [scope for _, scope in layers],
                              exclude=traced.jaxpr.invars[lo:hi])
        obs = _HealthObserver(traced.jaxpr, outputs, inputs)
        active = [lo <= i < hi and compat.is_inexact(compat.typeof(x))
                  for i, x in enumerate(flat_args)]
        with core.observing(obs):
            outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active)
            value = outs[0]
            cts = backward([jnp.ones((), compat.typeof(value).dtype)] + [None] * (len(outs) - 1))
        leaves = [api._instantiate(cts[j], flat_args[j]) for j in range(lo, hi)]
        grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args[argnums]), leaves)
        named_g = [(path_str(p), g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
        named_p = [(path_str(p), x)
                   for p, x in jax.tree_util.tree_flatten_with_path(args[argnums])[0]]
        health = {}
        for name, scope in layers:
            def mine(named):
                return [x for n, x in named if (n == name or n.startswith(name + "/"))
                        and compat.is_inexact(compat.typeof(x))]
            out = obs.values.get(scope)
            ct = obs.grads.get(scope)
            health[name] = LayerHealth(
                jnp.sqrt(jnp.sum(jnp.square(_f32(ct)))) if ct is not None
                else jnp.asarray(0.0, jnp.float32),
                _norm(mine(named_g)), _norm(mine(named_p)),
                jnp.mean(_f32(out)) if out is not None else jnp.asarray(_NAN, jnp.float32),
                jnp.std(_f32(out)) if out is not None else jnp.asarray(_NAN, jnp.float32),
                _dead_fraction(obs.to_input.get(scope)) if scope in inputs
                else jnp.asarray(_NAN, jnp.float32))
        return value, grads, health

    return wrapped


def update_health(params, updates, names: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
    """``{layer: {"update_norm", "update_ratio"}}`` for the layers of ``names`` that own
    parameters: ``||update||`` and ``||update|| / ||params||`` over the layer's leaves."""
    named_u = [(path_str(p), u) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]]
    named_p = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    out = {}
    for name in names:
        us = [u for n, u in named_u if n == name or n.startswith(name + "/")]
        if not us:
            continue
        ps = [x for n, x in named_p if n == name or n.startswith(name + "/")]
        u, p = _norm(us), _norm(ps)
        out[name] = {"update_norm": u, "update_ratio": u / p}
    return out


def health_warnings(health: dict, *, dead_fraction: float = 0.25, update_ratio_min: float = 1e-4,
                    update_ratio_max: float = 1e-1) -> list[str]:
    """Warnings for layers (host values: ``{layer: {key: float or None}}``) with more than
    ``dead_fraction`` dead units, or an update ratio outside ``[update_ratio_min,
    update_ratio_max]`` (a zero update, e.g. during warmup from 0, is not warned about)."""
    out = []
    for name, h in health.items():
        dead = h.get("dead_fraction")
        if dead is not None and math.isfinite(dead) and dead > dead_fraction:
            out.append(f"{dead:.0%} of the units entering layer '{name}' are dead (their "
                       "backward signal is exactly zero for every example of the batch), above "
                       f"diagnostics.dead_fraction={dead_fraction:g}; lower the learning rate, "
                       "or use leaky_relu/gelu.")
        ratio = h.get("update_ratio")
        if ratio is None or not math.isfinite(ratio) or ratio <= 0:
            continue
        if ratio > update_ratio_max:
            out.append(f"layer '{name}' moves fast: ||update|| / ||params|| = {ratio:.2g} "
                       f"(log10 {math.log10(ratio):.1f}), above diagnostics.update_ratio_max="
                       f"{update_ratio_max:g}; lower the learning rate.")
        elif ratio < update_ratio_min:
            out.append(f"layer '{name}' barely moves: ||update|| / ||params|| = {ratio:.2g} "
                       f"(log10 {math.log10(ratio):.1f}), below diagnostics.update_ratio_min="
                       f"{update_ratio_min:g}; raise the learning rate (or it is frozen).")
    return out


__all__ = ["LayerHealth", "layer_health", "layer_inputs", "update_health", "health_warnings"]

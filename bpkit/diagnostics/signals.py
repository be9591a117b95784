"""Backward signals: the error signal as it flows back through every named layer.

Because bpkit runs the backward sweep itself, it can read the cotangent of any intermediate
value. For each ``jax.named_scope`` (bpkit.nn applies every layer inside one, nested as
``block_0/attn``), the *layer output* is the last value computed inside the scope that is used
outside it; its cotangent ``dL/d(output)`` is the signal arriving at the layer from above. With
the parameter gradients grouped by the same names, this shows how the signal decays (vanishing
gradients) or blows up with depth, and it costs one norm per layer inside the jitted step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from bpkit.engine import api, compat, core


class LayerSignal(NamedTuple):
    """Norms for one named layer: ``||dL/d output||`` and ``||dL/d params||`` (NaN if none)."""

    activation_grad_norm: jax.Array
    param_grad_norm: jax.Array


def layer_outputs(jaxpr) -> dict[str, object]:
    """Map each name-scope path (every prefix of every equation's name stack) to its output
    variable: the last-defined variable inside the scope that is read outside it."""
    defined: dict = {}  # var -> (position, scope)
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.outvars:
            if not isinstance(v, compat.DropVar):
                defined[v] = (i, compat.name_stack(eqn))

    def prefixes(scope: str) -> list[str]:
        parts = [p for p in scope.split("/") if p]
        return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]

    best: dict[str, object] = {}
    readers = [(compat.name_stack(e), e.invars) for e in jaxpr.eqns] + [("", jaxpr.outvars)]
    for reader_scope, invars in readers:
        for v in invars:
            if not isinstance(v, compat.Var) or v not in defined:
                continue
            position, scope = defined[v]
            for p in prefixes(scope):
                escapes = not (reader_scope == p or reader_scope.startswith(p + "/"))
                if escapes and (p not in best or defined[best[p]][0] < position):
                    best[p] = v
    return best


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def backward_signals(fun: Callable, argnums: int = 0) -> Callable:
    """``backward_signals(loss)(params, *rest) -> (value, grads, {layer: LayerSignal})``.

    ``value`` and ``grads`` are exactly what ``bpkit.value_and_grad(loss, argnums)`` returns.
    Layers are the ``jax.named_scope`` paths seen in ``loss``; a layer's parameter gradient
    norm is taken over the gradient leaves whose dict path starts with the layer's name.
    """
    def wrapped(*args, **kwargs):
        flat_args, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        spans = api._leaf_spans(args)
        lo, hi = spans[argnums]
        traced = core.trace(fun, flat_args, in_tree)
        active = [lo <= i < hi and compat.is_inexact(compat.typeof(x))
                  for i, x in enumerate(flat_args)]
        outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active)
        value = outs[0]
        taps = layer_outputs(traced.jaxpr)
        wanted = {v: name for name, v in taps.items()}
        seen: dict[str, jax.Array] = {}

        def observe(v, ct):
            if v in wanted:
                seen[wanted[v]] = jnp.sqrt(jnp.sum(jnp.square(ct.astype(jnp.float32))))

        cts = backward([jnp.ones((), compat.typeof(value).dtype)] + [None] * (len(outs) - 1),
                       observe=observe)
        leaves = [api._instantiate(cts[j], flat_args[j]) for j in range(lo, hi)]
        grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args[argnums]), leaves)
        named = [(_path_name(p), g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
        signals = {}
        for name in sorted(taps):
            sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for n, g in named
                  if n == name or n.startswith(name + "/")]
            pnorm = jnp.sqrt(sum(sq)) if sq else jnp.asarray(jnp.nan, jnp.float32)
            act = seen.get(name, jnp.asarray(0.0, jnp.float32))
            signals[name] = LayerSignal(act, pnorm)
        return value, grads, signals

    return wrapped


def param_grad_norms(grads, layer_names: Sequence[str]) -> dict[str, jax.Array]:
    """Per-layer parameter-gradient norms from any gradient pytree (works for engine="jax")."""
    named = [(_path_name(p), g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
    out = {}
    for name in layer_names:
        sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for n, g in named
              if n == name or n.startswith(name + "/")]
        if sq:
            out[name] = jnp.sqrt(sum(sq))
    return out


def signal_warnings(signals: dict, *, vanish_ratio: float = 1e-3,
                    explode_ratio: float = 1e3) -> list[str]:
    """Warnings for layers whose backward signal vanished, exploded or turned non-finite.

    A layer's signal is compared with the top (last) layer's: below ``vanish_ratio`` times it
    is *vanishing*, above ``explode_ratio`` times it is *exploding*. ``signals`` maps layer
    names to ``LayerSignal`` (or to plain floats) in depth order, as ``backward_signals`` gives.
    """
    norms = {name: float(getattr(s, "activation_grad_norm", s)) for name, s in signals.items()}
    if not norms:
        return []
    import math
    top_name = list(norms)[-1]
    top = norms[top_name]
    out = []
    for name, n in norms.items():
        if not math.isfinite(n):
            out.append(f"backward signal at layer '{name}' is not finite ({n}).")
        elif top > 0 and n < vanish_ratio * top:
            out.append(f"backward signal vanishes at layer '{name}': ||dL/d output|| = {n:.3g}, "
                       f"{n / top:.2g} x the top layer '{top_name}' ({top:.3g}).")
        elif top > 0 and n > explode_ratio * top:
            out.append(f"backward signal explodes at layer '{name}': ||dL/d output|| = {n:.3g}, "
                       f"{n / top:.2g} x the top layer '{top_name}' ({top:.3g}).")
    return out

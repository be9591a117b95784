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
from bpkit.nn.core import path_str


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


def _scope_starts(jaxpr) -> dict[str, int]:
    """Each name-scope path -> index of the first equation inside it (forward order)."""
    starts: dict[str, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        parts = [p for p in compat.name_stack(eqn).split("/") if p]
        for j in range(1, len(parts) + 1):
            starts.setdefault("/".join(parts[:j]), i)
    return starts


def _depth_order(names, starts: dict[str, int]) -> list[str]:
    """``names`` in forward (depth) order: by first equation, a parent before its children."""
    return sorted(names, key=lambda n: (starts.get(n, len(starts) + 10 ** 9), n.count("/"), n))


def _model_root(names, param_names) -> str | None:
    """The one scope wrapping the whole model (``nn.sequential(..., name="mlp")``) when the
    parameter paths do not include it, so that layer names match the parameter dict paths."""
    roots = {n.split("/")[0] for n in names}
    if len(roots) != 1:
        return None
    root = roots.pop()
    if any(p == root or p.startswith(root + "/") for p in param_names):
        return None
    return root


def _layers(jaxpr, param_tree) -> list[tuple[str, str]]:
    """``(layer name, scope path)`` pairs in depth order; the layer name has the model's root
    scope (if any, see ``_model_root``) removed so that it matches the parameter paths."""
    taps = layer_outputs(jaxpr)
    scopes = _depth_order(taps, _scope_starts(jaxpr))
    param_names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(param_tree)[0]]
    root = _model_root(scopes, param_names)
    if root is None:
        return [(s, s) for s in scopes]
    return [(s[len(root) + 1:], s) for s in scopes if s != root]


def layer_names(fun: Callable, argnums: int = 0) -> Callable:
    """``layer_names(loss)(params, *rest) -> [layer, ...]``: the named layers of ``loss`` in
    depth order, named as ``backward_signals`` names them (nested ones as ``block_0/attn``).
    It only traces ``loss``; use it with ``param_grad_norms`` for gradients from ``jax.grad``.
    """
    def wrapped(*args, **kwargs):
        _, _, trace = api.flatten_wrt(fun, args, kwargs, [argnums % len(args)])
        return [name for name, _ in _layers(trace().jaxpr, args[argnums])]

    return wrapped


def backward_signals(fun: Callable, argnums: int = 0) -> Callable:
    """``backward_signals(loss)(params, *rest) -> (value, grads, {layer: LayerSignal})``.

    ``value`` and ``grads`` are exactly what ``bpkit.value_and_grad(loss, argnums)`` returns.
    Layers are the ``jax.named_scope`` paths seen in ``loss``, in depth (forward) order, a
    parent before its children; a scope wrapping the whole model whose name is not a
    parameter path (``nn.sequential(..., name="mlp")``) is dropped from the names. A layer's
    parameter gradient norm is taken over the gradient leaves whose dict path starts with the
    layer's name (NaN for a layer without parameters).
    """
    def wrapped(*args, **kwargs):
        i = argnums % len(args)
        flat_args, spans, trace = api.flatten_wrt(fun, args, kwargs, [i])
        lo, hi = spans[i]
        traced = trace()
        active = [compat.is_inexact(compat.typeof(x)) for x in flat_args]
        outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active)
        value = outs[0]
        taps = layer_outputs(traced.jaxpr)
        layers = _layers(traced.jaxpr, args[argnums])
        wanted: dict = {}  # var -> scopes it is the output of (a layer and its last sublayer)
        for _, scope in layers:
            wanted.setdefault(taps[scope], []).append(scope)
        seen: dict[str, jax.Array] = {}

        def observe(v, ct):
            for scope in wanted.get(v, ()):
                seen[scope] = jnp.sqrt(jnp.sum(jnp.square(ct.astype(jnp.float32))))

        cts = backward([jnp.ones((), compat.typeof(value).dtype)] + [None] * (len(outs) - 1),
                       observe=observe)
        leaves = [api._instantiate(cts[j], flat_args[j]) for j in range(lo, hi)]
        grads = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args[argnums]), leaves)
        named = [(path_str(p), g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
        signals = {}
        for name, scope in layers:
            sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for n, g in named
                  if n == name or n.startswith(name + "/")]
            pnorm = jnp.sqrt(sum(sq)) if sq else jnp.asarray(jnp.nan, jnp.float32)
            act = seen.get(scope, jnp.asarray(0.0, jnp.float32))
            signals[name] = LayerSignal(act, pnorm)
        return value, grads, signals

    return wrapped


def param_grad_norms(grads, layer_names: Sequence[str]) -> dict[str, jax.Array]:
    """Per-layer parameter-gradient norms from any gradient pytree (works for engine="jax")."""
    named = [(path_str(p), g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]]
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

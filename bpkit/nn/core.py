"""The layer contract and the combinators that compose layers.

A layer is a ``Layer(name, init, forward, init_state)`` NamedTuple of pure functions:

* ``init(key, in_shape, dtype=jnp.float32) -> (params, out_shape)``. Shapes are *per example*
  (without the batch axis): ``(40,)`` for vectors, ``(T, d)`` for sequences, ``(H, W, C)`` for
  images. ``init`` checks ``in_shape`` and raises ``ShapeError`` naming the layer and the
  mismatch. ``params`` is a plain nested dict (``{}`` for parameter-free layers).
* ``layer.apply(params, x, *, key=None, train=False) -> y`` runs ``forward`` inside
  ``jax.named_scope(layer.name)``, so every operation of the layer carries its name (gradient
  diagnostics attribute cotangents by it). ``x`` has a leading batch axis.
* Stateful layers (BatchNorm) also have ``init_state(in_shape, dtype) -> state``; their apply
  takes ``state=`` and returns ``(y, new_state)``. A combinator with a stateful child is
  itself stateful and threads a dict of its children's states.

Combinators (``sequential``, ``residual``, ``parallel``) name their children's parameter
subtrees by the children's names, numbering repeated names (``dense_0``, ``dense_1``), and
omit parameter-free children from the tree.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Shape = tuple


class ShapeError(ValueError):
    """A layer was initialised for an input shape it cannot take."""


class Layer(NamedTuple):
    """A layer: pure ``init`` and ``forward`` functions under a name (see the module docstring)."""

    name: str
    init: Callable[..., tuple[Any, Shape]]
    forward: Callable[..., Any]
    init_state: Optional[Callable[..., Any]] = None

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    def apply(self, params, x, *, key=None, train: bool = False, **kwargs):
        """``forward(params, x, key=key, train=train)`` inside ``jax.named_scope(self.name)``."""
        with jax.named_scope(self.name):
            return self.forward(params, x, key=key, train=train, **kwargs)

    def named(self, name: str) -> "Layer":
        """The same layer under another name (its parameter key in a combinator)."""
        return self._replace(name=name)


def layer(name: str, init: Callable, forward: Callable,
          init_state: Callable | None = None) -> Layer:
    """Build a ``Layer``; ``forward(params, x, *, key, train[, state])``."""
    return Layer(name, init, forward, init_state)


def stateless(name: str, fn: Callable[[jax.Array], jax.Array]) -> Layer:
    """A parameter-free, shape-preserving layer applying ``fn`` elementwise."""
    def init(key, in_shape, dtype=jnp.float32):
        del key, dtype
        return {}, tuple(in_shape)

    def forward(params, x, *, key=None, train=False):
        del params, key, train
        return fn(x)

    return Layer(name, init, forward)


def shape_error(layer_name: str, message: str) -> ShapeError:
    return ShapeError(f"{layer_name}: {message}")


def _unique_names(layers) -> list[Layer]:
    """Number repeated child names (``dense``, ``dense`` -> ``dense_0``, ``dense_1``)."""
    counts: dict[str, int] = {}
    for l in layers:
        if not isinstance(l, Layer):
            raise TypeError(f"combinators take Layer objects, got {type(l).__name__}: {l!r}. "
                            "Build layers with bpkit.nn factories such as nn.dense(64).")
        counts[l.name] = counts.get(l.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for l in layers:
        if counts[l.name] > 1:
            i = seen.get(l.name, 0)
            seen[l.name] = i + 1
            l = l.named(f"{l.name}_{i}")
        out.append(l)
    return out


def _child_key(key, i):
    return None if key is None else jax.random.fold_in(key, i)


def _init_children(layers, key, in_shapes, dtype):
    params, out_shapes = {}, []
    keys = jax.random.split(key, max(len(layers), 1))
    for l, k, s in zip(layers, keys, in_shapes):
        p, out = l.init(k, s, dtype)
        if jax.tree_util.tree_leaves(p):
            params[l.name] = p
        out_shapes.append(out)
    return params, out_shapes


def _run_child(l: Layer, params, x, key, train, states, new_states):
    p = params.get(l.name, {})
    if l.stateful:
        y, new_states[l.name] = l.apply(p, x, key=key, train=train, state=states[l.name])
        return y
    return l.apply(p, x, key=key, train=train)


def _init_children_state(layers, in_shapes, dtype):
    return {l.name: l.init_state(s, dtype) for l, s in zip(layers, in_shapes) if l.stateful}


def sequential(*layers: Layer, name: str = "sequential") -> Layer:
    """``layers[-1](... layers[1](layers[0](x)))``; params ``{child_name: child_params}``."""
    children = _unique_names(layers)
    stateful = any(l.stateful for l in children)

    def in_shapes(in_shape, dtype):
        shapes = [tuple(in_shape)]
        for l in children[:-1]:
            # Only shapes are needed: init on a dummy key is cheap and gives the chain.
            shapes.append(l.init(jax.random.key(0), shapes[-1], dtype)[1])
        return shapes

    def init(key, in_shape, dtype=jnp.float32):
        params, shape = {}, tuple(in_shape)
        keys = jax.random.split(key, max(len(children), 1))
        for l, k in zip(children, keys):
            p, shape = l.init(k, shape, dtype)
            if jax.tree_util.tree_leaves(p):
                params[l.name] = p
        return params, shape

    def forward(params, x, *, key=None, train=False, state=None):
        new_states: dict = {}
        for i, l in enumerate(children):
            x = _run_child(l, params, x, _child_key(key, i), train, state, new_states)
        return (x, new_states) if stateful else x

    def init_state(in_shape, dtype=jnp.float32):
        return _init_children_state(children, in_shapes(in_shape, dtype), dtype)

    return Layer(name, init, forward, init_state if stateful else None)


def residual(body: Layer, name: str = "residual") -> Layer:
    """``x + body(x)``; the body must preserve the shape. Params ``{body.name: ...}``."""
    stateful = body.stateful

    def init(key, in_shape, dtype=jnp.float32):
        params, out_shape = _init_children([body], key, [tuple(in_shape)], dtype)
        if tuple(out_shape[0]) != tuple(in_shape):
            raise shape_error(name, f"the residual body {body.name!r} maps shape {tuple(in_shape)} "
                              f"to {tuple(out_shape[0])}; x + body(x) needs them equal.")
        return params, tuple(in_shape)

    def forward(params, x, *, key=None, train=False, state=None):
        new_states: dict = {}
        y = _run_child(body, params, x, _child_key(key, 0), train, state, new_states)
        return (x + y, new_states) if stateful else x + y

    def init_state(in_shape, dtype=jnp.float32):
        return _init_children_state([body], [tuple(in_shape)], dtype)

    return Layer(name, init, forward, init_state if stateful else None)


def parallel(*branches: Layer, axis: int = -1, name: str = "parallel") -> Layer:
    """Apply every branch to the same input and concatenate the outputs along ``axis``.

    ``axis`` counts in the batched output (``-1``: features). Output shapes must agree
    everywhere except along ``axis``.
    """
    children = _unique_names(branches)
    stateful = any(l.stateful for l in children)

    def init(key, in_shape, dtype=jnp.float32):
        params, outs = _init_children(children, key, [tuple(in_shape)] * len(children), dtype)
        rank = len(outs[0])
        ax = axis % (rank + 1) - 1  # the axis in per-example shapes
        if ax < 0:
            raise shape_error(name, "cannot concatenate along the batch axis.")
        for l, o in zip(children, outs):
            if len(o) != rank or any(a != b for i, (a, b) in enumerate(zip(o, outs[0])) if i != ax):
                shapes = ", ".join(f"{c.name}: {s}" for c, s in zip(children, outs))
                raise shape_error(name, f"branch output shapes must agree except along axis "
                                  f"{axis}; got {shapes}.")
        out = list(outs[0])
        out[ax] = sum(o[ax] for o in outs)
        return params, tuple(out)

    def forward(params, x, *, key=None, train=False, state=None):
        new_states: dict = {}
        ys = [_run_child(l, params, x, _child_key(key, i), train, state, new_states)
              for i, l in enumerate(children)]
        y = jnp.concatenate(ys, axis=axis)
        return (y, new_states) if stateful else y

    def init_state(in_shape, dtype=jnp.float32):
        return _init_children_state(children, [tuple(in_shape)] * len(children), dtype)

    return Layer(name, init, forward, init_state if stateful else None)


def cast(tree, dtype):
    """Cast every floating-point leaf of ``tree`` to ``dtype`` (integer leaves are kept)."""
    def f(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    return jax.tree_util.tree_map(f, tree)


def path_str(path) -> str:
    """A pytree key path as a readable ``a/b/c`` name (dict keys, sequence indices, attributes)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_paths(params) -> list[str]:
    """Readable ``a/b/c`` paths of every leaf, e.g. ``block_0/attn/qkv/w``."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

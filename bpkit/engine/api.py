"""The public differentiation API: ``vjp``, ``grad``, ``value_and_grad`` with JAX's signatures.

These wrap the engine in ``bpkit.engine.core`` with JAX's pytree and dtype conventions:
gradients have the structure of the differentiated arguments; integer, boolean and PRNG-key
inputs are never differentiated (``grad`` refuses them unless ``allow_int=True``, ``vjp`` gives
float0 cotangents); keyword arguments are passed through undifferentiated.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bpkit.engine import compat, core


def vjp(fun: Callable, *primals, has_aux: bool = False, while_checkpoints: int | None = None):
    """``(out, vjp_fn)`` (or ``(out, vjp_fn, aux)``) like ``jax.vjp``, with bpkit's engine.

    ``vjp_fn(ct)`` takes a cotangent with the structure of ``out`` and returns a tuple with one
    cotangent per primal, each with the structure of that primal. ``while_checkpoints``: see
    ``grad``.
    """
    if while_checkpoints is not None:
        with _while_setting(while_checkpoints):
            return vjp(fun, *primals, has_aux=has_aux)
    flat_args, in_tree = jax.tree_util.tree_flatten((primals, {}))
    flat_args = [compat.as_array(x) for x in flat_args]
    traced = core.trace(fun, flat_args, in_tree)
    active_in = [compat.is_inexact(compat.typeof(x)) for x in flat_args]
    outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active_in)
    out_tree, aux = _split_aux(traced.out_tree, outs, has_aux, "vjp")
    num_out = out_tree.num_leaves
    out = jax.tree_util.tree_unflatten(out_tree, outs[:num_out])

    def vjp_fn(ct):
        ct_flat, ct_tree = jax.tree_util.tree_flatten(ct)
        if ct_tree != out_tree:
            raise TypeError(
                f"Tree structure of cotangent input {ct_tree} does not match the structure of "
                f"the primal output {out_tree}. Pass a cotangent with the same structure as "
                "the function's output.")
        for i, (c, o) in enumerate(zip(ct_flat, outs)):
            if np.shape(c) != np.shape(o):
                raise ValueError(
                    f"Shape of cotangent input to the vjp function, {np.shape(c)}, must equal "
                    f"the shape of the corresponding primal output, {np.shape(o)} (leaf {i}).")
        cts = backward(list(ct_flat) + [None] * (len(outs) - num_out))
        leaves = [_instantiate(c, x) for c, x in zip(cts, flat_args)]
        args_ct, _ = jax.tree_util.tree_unflatten(in_tree, leaves)
        return tuple(args_ct)

    return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                   allow_int: bool = False, *, while_checkpoints: int | None = None) -> Callable:
    """Like ``jax.value_and_grad``: returns ``f(*args) -> (value, grad)`` (``((value, aux), grad)``).

    ``while_checkpoints``: see ``grad``."""
    argnums_tuple = _check_argnums(argnums)

    @functools.wraps(fun)
    def value_and_grad_fun(*args, **kwargs):
        if max(argnums_tuple) >= len(args):
            raise TypeError(
                f"differentiating with respect to argnums={argnums} requires at least "
                f"{max(argnums_tuple) + 1} positional arguments to be passed by the caller, "
                f"but got only {len(args)} positional arguments.")
        flat_args, in_tree = jax.tree_util.tree_flatten((args, kwargs))
        flat_args = [compat.as_array(x) for x in flat_args]
        spans = _leaf_spans(args)
        wrt = set()
        for i in argnums_tuple:
            wrt.update(range(*spans[i]))
        for i in sorted(wrt):
            aval = compat.typeof(flat_args[i])
            if not compat.is_inexact(aval) and not allow_int:
                raise TypeError(
                    "grad requires real- or complex-valued inputs (input dtype that is a "
                    f"sub-dtype of np.inexact), but got {aval.dtype.name}. If you want to use "
                    "Boolean- or integer-valued inputs, use vjp or set allow_int to True.")
        traced = core.trace(fun, flat_args, in_tree)
        active_in = [i in wrt and compat.is_inexact(compat.typeof(x))
                     for i, x in enumerate(flat_args)]
        outs, backward, _ = core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active_in)
        out_tree, aux = _split_aux(traced.out_tree, outs, has_aux, "grad")
        if out_tree.num_leaves != 1:
            raise TypeError(
                "Gradient only defined for scalar-output functions, but the function returned "
                f"a pytree {out_tree}. Return a single scalar (use has_aux=True to return "
                "more).")
        value = outs[0]
        aval = compat.typeof(value)
        if aval.shape != ():
            raise TypeError("Gradient only defined for scalar-output functions. Output had "
                            f"shape: {aval.shape}.")
        if not jax.dtypes.issubdtype(aval.dtype, np.floating):
            raise TypeError(
                "grad requires real-valued outputs (output dtype that is a sub-dtype of "
                f"np.floating), but got {aval.dtype.name}. For complex outputs use bpkit.vjp "
                "directly.")
        cts = backward([jnp.ones((), aval.dtype)] + [None] * (len(outs) - 1))
        grads = []
        for i in argnums_tuple:
            lo, hi = spans[i]
            leaves = [_instantiate(cts[j], flat_args[j]) for j in range(lo, hi)]
            grads.append(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args[i]),
                                                      leaves))
        grad = grads[0] if isinstance(argnums, int) else tuple(grads)
        value = jax.tree_util.tree_unflatten(out_tree, [value])
        return ((value, aux) if has_aux else value), grad

    return _with_while_setting(value_and_grad_fun, while_checkpoints)


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         allow_int: bool = False, *, while_checkpoints: int | None = None) -> Callable:
    """Like ``jax.grad``: the gradient of a scalar function, by bpkit's hand-written rules.

    ``while_checkpoints``: how many loop states the gradient of each ``lax.while_loop`` keeps
    (default 16, or what ``bpkit.while_checkpoints`` sets around the call; see
    ``bpkit/rules/loops.py``); bound to the function, so it holds under ``jax.jit`` too."""
    vg = value_and_grad(fun, argnums, has_aux=has_aux, allow_int=allow_int,
                        while_checkpoints=while_checkpoints)

    @functools.wraps(fun)
    def grad_fun(*args, **kwargs):
        (value_or_pair), g = vg(*args, **kwargs)
        return (g, value_or_pair[1]) if has_aux else g

    return grad_fun


def _while_setting(count: int):
    """The ``bpkit.while_checkpoints(count)`` context (the setting lives with the while rule)."""
    from bpkit.rules.loops import while_checkpoints
    return while_checkpoints(count)


def _with_while_setting(fun: Callable, count: int | None) -> Callable:
    """``fun`` run with ``bpkit.while_checkpoints(count)`` in force (``None``: as set outside)."""
    if count is None:
        return fun
    setting = _while_setting(count)  # a bad count is reported now, not at the first call

    @functools.wraps(fun)
    def with_setting(*args, **kwargs):
        with setting:
            return fun(*args, **kwargs)

    return with_setting


def _check_argnums(argnums) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums or not all(isinstance(i, int) and i >= 0 for i in nums):
        raise TypeError(f"argnums must be a non-negative int or a non-empty tuple of them, "
                        f"got {argnums!r}.")
    return nums


def _leaf_spans(args) -> list[tuple[int, int]]:
    """For each positional argument, the ``[lo, hi)`` range of its leaves in the flat inputs."""
    spans, start = [], 0
    for a in args:
        n = jax.tree_util.tree_structure(a).num_leaves
        spans.append((start, start + n))
        start += n
    return spans


def _split_aux(out_tree, outs, has_aux: bool, who: str):
    """Split ``(out, aux)`` outputs when ``has_aux``; returns ``(out_tree, aux)``."""
    if not has_aux:
        return out_tree, None
    positions = jax.tree_util.tree_unflatten(out_tree, list(range(len(outs))))
    if not isinstance(positions, (tuple, list)) or len(positions) != 2:
        raise TypeError(
            f"{who}(..., has_aux=True) requires the function to return a pair (output, aux), "
            f"but it returned a pytree {out_tree}.")
    out_part, aux_part = positions
    n = jax.tree_util.tree_structure(out_part).num_leaves
    aux = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(aux_part), outs[n:])
    return jax.tree_util.tree_structure(out_part), aux


def _instantiate(ct, primal):
    """A materialised cotangent for ``primal``: zeros for a symbolic zero, float0 for integers."""
    aval = compat.typeof(primal)
    if not compat.is_inexact(aval):
        return compat.float0_zeros(aval)
    if ct is None:
        return jnp.zeros(aval.shape, aval.dtype)
    return ct


__all__: list[Any] = ["vjp", "grad", "value_and_grad"]

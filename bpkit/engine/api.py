"""The public differentiation API: ``vjp``, ``grad``, ``value_and_grad`` with JAX's signatures.

These wrap the engine in ``bpkit.engine.core`` with JAX's pytree and dtype conventions:
gradients have the structure of the differentiated arguments; integer, boolean and PRNG-key
inputs are never differentiated (``grad`` refuses them unless ``allow_int=True``, ``vjp`` gives
float0 cotangents).

**Calling convention** (``jax.grad``'s): only the ``argnums`` arguments are traced and
differentiated. Every other positional and keyword argument reaches the function exactly as
the caller passed it: Python bools, ints and strings, modules, callables, and arrays, so
Python control flow on them, ``range(n)``, ``lax.fori_loop(0, n, ...)`` with a concrete bound
(a scan, differentiable) and library objects behave as under ``jax.grad``, eagerly and inside
``jax.jit`` (where the caller's values are the jit's tracers, for bpkit as for JAX). ``vjp``
differentiates all its primals; what the function closes over reaches it untouched.

**Trace cache.** A trace is reused for a call whose differentiated leaves have the same
shapes and dtypes and whose other arguments are the same, keyed the way ``jax.jit`` keys
static arguments: hashable values by type and value (``train=True`` and ``train=False`` are two
traces), a concrete ``jax.Array`` by identity (it is immutable, so the same object is the same
value; the last two such traces per function are kept, holding their arrays), and anything
else (a NumPy array, which can be mutated in place; an unhashable object; an enclosing
transformation's tracer) is not cached: that call traces afresh.

Why concrete arrays are not traced abstractly to share one trace across batches: the function
must see the caller's values (JAX's semantics), and whether a trace depended on them cannot
be told afterwards. Looking at a value is everywhere in ordinary code and mostly harmless:
``jnp.asarray(x)``, ``x.astype(...)``, ``one_hot``, ``device_put`` and optax's losses all ask
whether their input is concrete, while ``fori_loop``, ``x ** n`` and boolean masks change
the program they emit on the answer. Tracing abstractly and detecting such queries would
miss nothing only by treating all of them as dependence, which retraces for nearly every
real loss anyway. So an eager call with a new batch array traces once (like ``jax.grad``,
which re-runs the Python function on every call); the same array, or any value inside
``jax.jit`` (the fast path), costs no trace.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bpkit.engine import compat, core


def vjp(fun: Callable, *primals, has_aux: bool = False, while_checkpoints: int | None = None,
        remat: Any = None, remat_budget_bytes: int | None = None):
    """``(out, vjp_fn)`` (or ``(out, vjp_fn, aux)``) like ``jax.vjp``, with bpkit's engine.

    ``vjp_fn(ct)`` takes a cotangent with the structure of ``out`` and returns a tuple with one
    cotangent per primal, each with the structure of that primal. ``while_checkpoints``,
    ``remat``, ``remat_budget_bytes``: see ``grad``.
    """
    if while_checkpoints is not None:
        with _while_setting(while_checkpoints):
            return vjp(fun, *primals, has_aux=has_aux, remat=remat,
                       remat_budget_bytes=remat_budget_bytes)
    policy = remat_policy(remat, remat_budget_bytes)
    flat_args, in_tree = jax.tree_util.tree_flatten((primals, {}))
    flat_args = [compat.as_array(x) for x in flat_args]
    traced = core.trace(fun, flat_args, in_tree, **_checkpointed(fun, policy))
    active_in = [compat.is_inexact(compat.typeof(x)) for x in flat_args]
    num_out = (traced.out_tree.children()[0].num_leaves if has_aux and traced.out_tree.children()
               else traced.out_tree.num_leaves)
    outs, backward, _ = _vjp_jaxpr(traced, flat_args, active_in, policy, remat_budget_bytes,
                                   range(num_out))
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
                   allow_int: bool = False, *, while_checkpoints: int | None = None,
                   remat: Any = None, remat_budget_bytes: int | None = None) -> Callable:
    """Like ``jax.value_and_grad``: ``f(*args) -> (value, grad)`` (``((value, aux), grad)``).

    ``while_checkpoints``, ``remat``, ``remat_budget_bytes``: see ``grad``."""
    argnums_tuple = _check_argnums(argnums)
    policy = remat_policy(remat, remat_budget_bytes)

    @functools.wraps(fun)
    def value_and_grad_fun(*args, **kwargs):
        positions = _positions(argnums, argnums_tuple, len(args))
        flat_args, spans, trace = flatten_wrt(fun, args, kwargs, positions, policy)
        for x in flat_args:
            aval = compat.typeof(x)
            if not compat.is_inexact(aval) and not allow_int:
                raise TypeError(
                    "grad requires real- or complex-valued inputs (input dtype that is a "
                    f"sub-dtype of np.inexact), but got {aval.dtype.name}. If you want to use "
                    "Boolean- or integer-valued inputs, use vjp or set allow_int to True.")
        traced = trace()
        active_in = [compat.is_inexact(compat.typeof(x)) for x in flat_args]
        outs, backward, _ = _vjp_jaxpr(traced, flat_args, active_in, policy,
                                       remat_budget_bytes, (0,))
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
        grad = gradients_of(cts, flat_args, spans, args, positions, argnums)
        value = jax.tree_util.tree_unflatten(out_tree, [value])
        return ((value, aux) if has_aux else value), grad

    return _with_while_setting(value_and_grad_fun, while_checkpoints)


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         allow_int: bool = False, *, while_checkpoints: int | None = None,
         remat: Any = None, remat_budget_bytes: int | None = None) -> Callable:
    """Like ``jax.grad``: the gradient of a scalar function, by bpkit's hand-written rules.

    ``while_checkpoints``: how many loop states the gradient of each ``lax.while_loop`` keeps
    (default 16, or what ``bpkit.while_checkpoints`` sets around the call; see
    ``bpkit/rules/loops.py``); bound to the function, so it holds under ``jax.jit`` too.

    ``remat``: which forward values the backward pass keeps. ``None`` (default): every value a
    rule reads. ``"auto"``: the fewest bytes from which the rest is recomputed by cheap
    elementwise and data-movement equations (a minimum cut, ``bpkit/engine/remat.py``);
    ``remat_budget_bytes`` then bounds the saved bytes, recomputing reductions and then matrix
    products if that is what it takes. A ``jax.checkpoint`` policy (or its name in
    ``jax.checkpoint_policies``, such as ``"dots_with_no_batch_dims_saveable"``): the whole
    function is differentiated as ``jax.checkpoint(fun, policy=...)``. Gradients are the same
    values either way."""
    vg = value_and_grad(fun, argnums, has_aux=has_aux, allow_int=allow_int,
                        while_checkpoints=while_checkpoints, remat=remat,
                        remat_budget_bytes=remat_budget_bytes)

    @functools.wraps(fun)
    def grad_fun(*args, **kwargs):
        (value_or_pair), g = vg(*args, **kwargs)
        return (g, value_or_pair[1]) if has_aux else g

    return grad_fun


def remat_policy(remat, budget):
    """``remat`` checked: ``None``, ``"auto"`` or a ``jax.checkpoint`` policy (a callable)."""
    names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")
             and n.endswith(("saveable", "saveable_policy"))]
    if remat is None or remat == "none":
        policy = None
    elif remat == "auto" or callable(remat):
        policy = remat
    elif isinstance(remat, str) and remat in names:
        policy = getattr(jax.checkpoint_policies, remat)
    else:
        raise ValueError(
            f"remat={remat!r} is not a remat setting. Use None, 'auto', a jax.checkpoint policy, "
            f"or the name of one in jax.checkpoint_policies: {', '.join(sorted(names))}.")
    if budget is not None and policy != "auto":
        raise ValueError(f"remat_budget_bytes={budget!r} needs remat='auto' (got remat={remat!r}).")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer))
                               or budget < 0):
        raise ValueError(f"remat_budget_bytes must be a non-negative int of bytes, got {budget!r}.")
    return policy


def _checkpointed(fun: Callable, policy) -> dict:
    """``core.trace`` keyword arguments that trace ``fun`` under ``jax.checkpoint(policy)``."""
    if policy is None or policy == "auto":
        return {}
    return {"call": jax.checkpoint(fun, policy=policy), "static_key": ("remat", policy)}


def _vjp_jaxpr(traced, flat_args, active_in, policy, budget, ct_outputs):
    """The engine's forward pass (and backward closure), under the ``remat="auto"`` plan when
    asked for and no equation observer is installed (an observer sees the plain engine)."""
    if policy == "auto" and core.current_observer() is None:
        from bpkit.engine import remat
        return remat.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active_in, budget,
                               tuple(ct_outputs))
    return core.vjp_jaxpr(traced.jaxpr, traced.consts, flat_args, active_in)


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
    if not nums or not all(isinstance(i, int) for i in nums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}.")
    return nums


def _positions(argnums, nums: tuple[int, ...], num_args: int) -> list[int]:
    """``argnums`` as non-negative positions (JAX accepts ``-1`` for the last argument)."""
    for i in nums:
        if not -num_args <= i < num_args:
            raise TypeError(
                f"differentiating with respect to argnums={argnums} requires at least "
                f"{(i if i >= 0 else -i - 1) + 1} positional arguments to be passed by the "
                f"caller, but got only {num_args} positional arguments.")
    return [i % num_args for i in nums]


def flatten_wrt(fun: Callable, args: tuple, kwargs: dict, positions: Sequence[int],
                policy=None):
    """The differentiated leaves of ``fun(*args, **kwargs)`` and how to trace it (under
    ``jax.checkpoint(policy=policy)`` when ``policy`` is a checkpoint policy).

    Returns ``(flat_args, spans, trace)``: the leaves of ``args[i]`` for ``i`` in
    ``positions`` (Python scalars as arrays), ``spans[i] = (lo, hi)`` their range in
    ``flat_args``, and ``trace()``, which traces ``fun`` with those leaves as inputs and every
    other argument passed as the caller passed it (cached, see the module docstring).
    """
    dyn_pos = sorted(set(positions))
    call, dyn_args, static_key, keepalive = _partial(fun, args, kwargs, dyn_pos)
    if policy is not None and policy != "auto":
        call = jax.checkpoint(call, policy=policy)
        static_key = None if static_key is None else (static_key, "remat", policy)
    flat_args, in_tree = jax.tree_util.tree_flatten((dyn_args, {}))
    flat_args = [compat.as_array(x) for x in flat_args]
    spans = dict(zip(dyn_pos, _leaf_spans(dyn_args)))

    def trace() -> core.Traced:
        return core.trace(fun, flat_args, in_tree, call=call, static_key=static_key,
                          keepalive=keepalive)

    return flat_args, spans, trace


class _Uncacheable(Exception):
    """A non-differentiated argument that cannot be part of a trace-cache key."""


def _partial(fun: Callable, args: tuple, kwargs: dict, dyn_pos: Sequence[int]):
    """JAX's ``argnums_partial``: ``(call, dyn_args, static_key, keepalive)``.

    ``call(*dyn_args)`` calls ``fun(*args, **kwargs)`` with the arguments at ``dyn_pos``
    replaced by the traced ``dyn_args``; every other argument is passed as the caller passed
    it. ``static_key`` keys those arguments for the trace cache (``None``: do not cache; see
    the module docstring) and ``keepalive`` lists the arrays it names by identity.
    """
    dyn_args = tuple(args[i] for i in dyn_pos)

    def call(*dyn):
        full = list(args)
        for i, a in zip(dyn_pos, dyn):
            full[i] = a
        return fun(*full, **kwargs)

    statics = (tuple((i, a) for i, a in enumerate(args) if i not in dyn_pos), kwargs)
    leaves, treedef = jax.tree_util.tree_flatten(statics)
    keepalive: list = []
    try:
        key = (treedef, tuple(_static_leaf_key(x, keepalive) for x in leaves))
        hash(key)
    except (_Uncacheable, TypeError):
        return call, dyn_args, None, ()
    return call, dyn_args, key, keepalive


def _static_leaf_key(x, keepalive: list):
    """How ``jax.jit`` would key a static argument: by type and value; arrays by identity."""
    if compat.is_tracer(x):
        raise _Uncacheable  # an enclosing transformation's value: this trace closes over it
    if isinstance(x, jax.Array):
        keepalive.append(x)  # immutable: while it is alive, its id stands for its value
        return ("jax.Array", id(x))
    if isinstance(x, np.ndarray):
        raise _Uncacheable  # mutable in place: the same object may hold new values next call
    return (type(x), x)


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


def gradients_of(cts, flat_args, spans, args, positions, argnums):
    """The gradient pytrees of the arguments at ``positions`` from the flat input cotangents
    ``cts`` (symbolic zeros instantiated), one tree per argument; a single tree when
    ``argnums`` is an int, as ``jax.grad`` returns."""
    grads = []
    for i in positions:
        lo, hi = spans[i]
        leaves = [_instantiate(cts[j], flat_args[j]) for j in range(lo, hi)]
        grads.append(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(args[i]), leaves))
    return grads[0] if isinstance(argnums, int) else tuple(grads)


def _instantiate(ct, primal):
    """A materialised cotangent for ``primal``: zeros for a symbolic zero, float0 for integers."""
    aval = compat.typeof(primal)
    if not compat.is_inexact(aval):
        return compat.float0_zeros(aval)
    if ct is None:
        return jnp.zeros(aval.shape, aval.dtype)
    return ct


__all__: list[Any] = ["vjp", "grad", "value_and_grad"]

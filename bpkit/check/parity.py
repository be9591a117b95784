"""Gradient parity: bpkit's gradient against ``jax.grad`` and against float64 finite differences.

This module (and ``bpkit.testing``) is the one place where ``jax.grad`` is used: as the
reference the engine is measured against.

For every differentiated leaf the report gives

* ``jax_abs``/``jax_rel``: the largest absolute difference between bpkit's and jax.grad's
  gradient, and that difference relative to the largest magnitude of jax.grad's gradient;
* ``fd_abs``/``fd_rel``: along ``directions`` random unit directions ``v``, the difference
  between bpkit's directional derivative ``<g, v>`` (computed in float64) and the central
  difference ``(f(x + eps v) - f(x - eps v)) / (2 eps)`` in float64, absolute and relative to
  the larger of the two magnitudes.

Complex leaves follow JAX's convention: the gradient of a real ``f`` at ``z = x + iy`` is
``g = df/dx - i df/dy``, so a step ``z + t v`` changes ``f`` at rate ``Re(sum(g * v))``. Their
directions alternate between the real part (``v`` real) and the imaginary part (``v``
imaginary), so each part is checked by finite differences separately.

Tolerances (``DEFAULT_TOLERANCES``) depend on the dtype of the leaf for the jax.grad comparison
(rounding differs with the order of operations) and are float64-tight for finite differences:

=========  ===========  ==========================================
dtype      jax.grad     finite differences (always run in float64)
=========  ===========  ==========================================
float64    rtol 1e-9    rtol 1e-5
float32    rtol 2e-5    rtol 1e-5
bfloat16   rtol 2e-2    rtol 1e-5
complex*   as its part  rtol 1e-5
=========  ===========  ==========================================

A leaf passes when ``abs <= atol + rtol * scale``, with ``atol = rtol * 1e-3`` for scale-free
cases (a gradient that is exactly zero in both engines passes).
"""
from __future__ import annotations

import functools

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bpkit.engine import api, compat

DEFAULT_TOLERANCES = {"float64": 1e-9, "float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3,
                      "complex128": 1e-9, "complex64": 2e-5}
FD_RTOL = 1e-5


@dataclass
class LeafParity:
    """Parity of the gradient of one differentiated leaf."""

    path: str
    shape: tuple
    dtype: str
    jax_abs: float
    jax_rel: float
    fd_abs: float | None
    fd_rel: float | None
    jax_ok: bool
    fd_ok: bool

    @property
    def ok(self) -> bool:
        return self.jax_ok and self.fd_ok


@dataclass
class ParityReport:
    """The result of ``check_parity``: ``.ok`` and one ``LeafParity`` per differentiated leaf."""

    leaves: list[LeafParity] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(leaf.ok for leaf in self.leaves)

    @property
    def max_jax_abs(self) -> float:
        return max((l.jax_abs for l in self.leaves), default=0.0)

    @property
    def max_fd_rel(self) -> float:
        return max((l.fd_rel or 0.0 for l in self.leaves), default=0.0)

    def failures(self) -> list[LeafParity]:
        return [leaf for leaf in self.leaves if not leaf.ok]

    def __str__(self) -> str:
        head = ("path", "shape", "dtype", "vs jax abs", "vs jax rel", "vs fd abs", "vs fd rel", "")
        rows = [head]
        for l in self.leaves:
            rows.append((l.path, str(l.shape), l.dtype, f"{l.jax_abs:.2e}", f"{l.jax_rel:.2e}",
                         "-" if l.fd_abs is None else f"{l.fd_abs:.2e}",
                         "-" if l.fd_rel is None else f"{l.fd_rel:.2e}",
                         "OK" if l.ok else "MISMATCH"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        verdict = "parity OK" if self.ok else f"{len(self.failures())} leaf/leaves MISMATCH"
        lines.append(f"{verdict}: max |bpkit - jax.grad| = {self.max_jax_abs:.2e}, "
                     f"max finite-difference rel err = {self.max_fd_rel:.2e}")
        return "\n".join(lines)


def check_parity(fun: Callable, *args, argnums: int | Sequence[int] = 0, fd: bool = True,
                 directions: int = 2, eps: float = 1e-6, rtol: float | None = None,
                 fd_rtol: float = FD_RTOL, seed: int = 0, grad_options: dict | None = None,
                 **kwargs) -> ParityReport:
    """Compare ``bpkit.grad(fun, argnums)`` with ``jax.grad`` and with float64 finite differences.

    ``fun`` must return a real scalar. Keyword arguments go to ``fun`` undifferentiated.
    ``fd=False`` skips finite differences (use it exactly at kinks, where they are undefined).
    ``grad_options``: keyword arguments of ``bpkit.grad`` (``remat="auto"``, ...).
    """
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    bpkit_grad = functools.partial(api.grad, **(grad_options or {}))
    g_bpkit = _jitted_grad(bpkit_grad, fun, nums, kwargs)(*args)
    g_jax = _jitted_grad(jax.grad, fun, nums, kwargs)(*args)
    fd_errors = (_finite_difference_errors(fun, args, kwargs, nums, directions, eps, seed,
                                           g_bpkit if _all_64_bit((args, kwargs)) else None)
                 if fd else {})
    report = ParityReport()
    for k, i in enumerate(nums):
        paths_leaves = jax.tree_util.tree_flatten_with_path(args[i])[0]
        bp_leaves = jax.tree_util.tree_leaves(g_bpkit[k])
        jx_leaves = jax.tree_util.tree_leaves(g_jax[k])
        for j, ((path, x), gb, gj) in enumerate(zip(paths_leaves, bp_leaves, jx_leaves)):
            name = f"arg{i}{jax.tree_util.keystr(path)}"
            dtype = np.dtype(compat.typeof(x).dtype)
            rt = rtol if rtol is not None else DEFAULT_TOLERANCES.get(dtype.name, 1e-5)
            gb64, gj64 = _as_64(gb), _as_64(gj)
            jax_abs = float(np.max(np.abs(gb64 - gj64), initial=0.0))
            scale = float(np.max(np.abs(gj64), initial=0.0))
            jax_ok = jax_abs <= rt * (scale + 1e-3)
            fd_abs, fd_rel = fd_errors.get((i, j), (None, None))
            fd_ok = fd_abs is None or fd_rel <= fd_rtol or fd_abs <= fd_rtol * 1e-3
            report.leaves.append(LeafParity(name, tuple(np.shape(x)), dtype.name, jax_abs,
                                            jax_abs / max(scale, 1e-30), fd_abs, fd_rel,
                                            bool(jax_ok), bool(fd_ok)))
    return report


def _jitted_grad(grad, fun, nums, kwargs):
    """``grad(fun, nums)`` under ``jax.jit`` (one compile instead of one per primitive, as
    eager execution would do), with ``kwargs`` closed over: they may be Python values."""
    return jax.jit(lambda *a: grad(fun, nums)(*a, **kwargs))


@contextlib.contextmanager
def float64_enabled():
    """Temporarily enable 64-bit types (finite differences are always taken in float64)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _as_64(x) -> np.ndarray:
    """``x`` as a float64 (complex128 for complex) NumPy array."""
    return np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)


def _to_float64(tree):
    def cast(x):
        aval = compat.typeof(x)
        if not compat.is_inexact(aval):
            return x
        return jnp.asarray(x, jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64)
    return jax.tree_util.tree_map(cast, tree)


def _all_64_bit(tree) -> bool:
    """True when every floating-point leaf is already float64/complex128."""
    avals = [compat.typeof(x) for x in jax.tree_util.tree_leaves(tree)]
    return all(a.dtype in (np.float64, np.complex128) for a in avals if compat.is_inexact(a))


def _finite_difference_errors(fun, args, kwargs, nums, directions, eps, seed,
                              grads64=None) -> dict:
    """``{(argnum, leaf): (abs, rel)}``: the largest error of bpkit's directional derivative
    against central differences along ``directions`` random unit directions, all in float64.

    bpkit's float64 gradient is computed once; the function is jitted once and evaluated at
    ``x +- step v`` for every leaf and direction (the cost of a parity check is dominated by
    these evaluations)."""
    errors = {}
    with float64_enabled():
        args64 = _to_float64(args)
        kwargs64 = _to_float64(kwargs)
        if grads64 is None:  # bpkit's gradient in float64 (given when args already were)
            grads64 = _jitted_grad(api.grad, fun, nums, kwargs64)(*args64)
        fun64 = jax.jit(lambda a, kw: fun(*a, **kw))
        rng = np.random.default_rng(seed)
        for k, i in enumerate(nums):
            leaves, treedef = jax.tree_util.tree_flatten(args64[i])
            grad_leaves = jax.tree_util.tree_leaves(grads64[k])
            for j, (x, g) in enumerate(zip(leaves, grad_leaves)):
                x, g = _as_64(x), _as_64(g)
                # Step relative to the leaf's magnitude so large parameters are probed fairly.
                step = eps * max(1.0, float(np.max(np.abs(x), initial=0.0)))
                worst_abs = worst_rel = 0.0
                for d in range(directions):
                    v = rng.standard_normal(x.shape)
                    v /= max(float(np.linalg.norm(v)), 1e-300)
                    if np.iscomplexobj(x) and d % 2:
                        v = 1j * v  # every other direction probes the imaginary part

                    def at(t):
                        new_leaves = list(leaves)
                        new_leaves[j] = jnp.asarray(x + t * v)
                        new_args = list(args64)
                        new_args[i] = jax.tree_util.tree_unflatten(treedef, new_leaves)
                        return float(fun64(tuple(new_args), kwargs64))

                    fd = (at(step) - at(-step)) / (2 * step)
                    analytic = float(np.real(np.sum(g * v)))
                    err = abs(fd - analytic)
                    worst_abs = max(worst_abs, err)
                    worst_rel = max(worst_rel, err / max(abs(fd), abs(analytic), 1e-12))
                if not math.isfinite(worst_abs):
                    worst_abs = worst_rel = math.inf
                errors[(i, j)] = (worst_abs, worst_rel)
    return errors


__all__: list[Any] = ["check_parity", "ParityReport", "LeafParity", "DEFAULT_TOLERANCES"]

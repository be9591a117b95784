"""The rule-test table format and its runner.

Each ``tests/rules/test_<family>.py`` holds ``CASES``, a list of ``Case`` rows in the order of
the rules in ``bpkit/rules/<family>.py``. A case is a function of array arguments and a maker of
those arguments; the runner reduces the function's outputs to a scalar with fixed random
weights (so every output element gets its own cotangent) and asserts parity of bpkit against
jax.grad (float64 eager and jitted, float32 jitted) and against float64 finite differences.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import bpkit
from bpkit.testing import assert_parity


@dataclass(frozen=True)
class Case:
    name: str
    fun: Callable
    make_args: Callable  # (rng: np.random.Generator, dtype) -> tuple of arguments
    argnums: tuple = (0,)
    fd: bool = True  # False exactly at kinks, where finite differences are undefined
    dtypes: tuple = ("float32", "float64")
    rtol: float | None = None
    marks: tuple = field(default=())
    context: Callable | None = None  # a context manager factory the check runs inside (a mesh)

    def __str__(self):
        return self.name


def uniform(*shape, lo=-2.0, hi=2.0):
    """Argument maker piece: uniform values in ``[lo, hi)``."""
    return lambda rng, dtype: jnp.asarray(rng.uniform(lo, hi, size=shape), dtype)


def normal(*shape):
    return lambda rng, dtype: jnp.asarray(rng.standard_normal(size=shape), dtype)


def const(value):
    """Argument maker piece: a fixed value (indices, or points at a kink); floating-point
    values are cast to the case's dtype."""
    def make(rng, dtype):
        v = jnp.asarray(value)
        return v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
    return make


def args(*pieces):
    """Combine argument-maker pieces into a ``make_args``."""
    return lambda rng, dtype: tuple(p(rng, dtype) for p in pieces)


def scalarize(fun, example_args, seed=0):
    """``loss(*a) = sum_k <w_k, fun(*a)_k>`` with fixed random weights ``w_k``."""
    out_shapes = jax.eval_shape(fun, *example_args)
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(s.shape) for s in jax.tree_util.tree_leaves(out_shapes)]

    def loss(*a):
        outs = jax.tree_util.tree_leaves(fun(*a))
        total = 0.0
        for o, w in zip(outs, weights):
            if jnp.issubdtype(o.dtype, jnp.inexact):
                total = total + jnp.sum(o * jnp.asarray(w, o.dtype)).astype(jnp.float64)
        return total
    return loss


def assert_case_parity(case: Case, dtype: str, jit: bool) -> None:
    """Assert bpkit == jax.grad for ``case`` (and == float64 finite differences when eager)."""
    if case.context is not None:
        with case.context():
            return assert_case_parity(dataclasses.replace(case, context=None), dtype, jit)
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    a = case.make_args(rng, jnp.dtype(dtype))
    loss = scalarize(case.fun, a)
    if jit:
        g_bp = jax.jit(bpkit.grad(loss, case.argnums))(*a)
        g_jx = jax.jit(jax.grad(loss, case.argnums))(*a)
        tol = case.rtol or bpkit.check.DEFAULT_TOLERANCES[dtype]
        for x, y in zip(jax.tree_util.tree_leaves(g_bp), jax.tree_util.tree_leaves(g_jx)):
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                       rtol=tol, atol=tol * (1e-3 + float(np.max(np.abs(y), initial=0))))
    else:
        assert_parity(loss, *a, argnums=case.argnums, fd=case.fd and dtype == "float64",
                      rtol=case.rtol)


def parametrize(cases):
    """pytest parameters: every case in float64 eagerly (with finite differences) and jitted,
    and in float32 jitted (float32 runs the same rule code as float64 eagerly; jit is where a
    dtype-specific problem would show)."""
    import pytest
    params = []
    for c in cases:
        for dt in c.dtypes:
            for jit in ((False, True) if dt == "float64" else (True,)):
                params.append(pytest.param(c, dt, jit, id=f"{c.name}-{dt}-{'jit' if jit else 'eager'}",
                                           marks=list(c.marks)))
    return pytest.mark.parametrize("case,dtype,jit", params)

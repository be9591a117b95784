"""The rule-test table format and its runner.

Each ``tests/rules/test_<family>.py`` holds ``CASES``, a list of ``Case`` rows in the order of
the rules in ``bpkit/rules/<family>.py``. A case is a function of array arguments and a maker of
those arguments; the runner reduces the function's outputs to a scalar with fixed random
weights (so every output element gets its own cotangent) and asserts parity of bpkit against
jax.grad (float64 eager and jitted, float32 jitted) and against float64 finite differences.

Complex rows (``dtypes`` including ``"complex64"``/``"complex128"``, e.g. ``WITH_COMPLEX``) get
complex arguments from the same makers (``real_arg`` keeps an argument real) and random
complex cotangents for complex outputs: complex64 compares ``bpkit.vjp`` with ``jax.vjp``
jitted; complex128 checks the real loss ``Re(sum(w * f))`` (whose JAX gradient is exactly the
VJP of ``w``) against jax.grad and against finite differences on the real and imaginary parts
of every argument separately.
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


FLOATS = ("float32", "float64")
COMPLEX = ("complex64", "complex128")
WITH_COMPLEX = FLOATS + COMPLEX


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
    # "<dtype>-<jit|eager>" runs that only run with `pytest -m slow` (expensive compiles)
    slow_modes: tuple = field(default=())
    context: Callable | None = None  # a context manager factory the check runs inside (a mesh)

    def __str__(self):
        return self.name


def _is_complex(dtype) -> bool:
    return jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating)


def _draw(draw, shape, dtype):
    """``draw(shape)`` as ``dtype``; complex dtypes draw the real and imaginary parts apart."""
    if _is_complex(dtype):
        return jnp.asarray(draw(shape) + 1j * draw(shape), dtype)
    return jnp.asarray(draw(shape), dtype)


def uniform(*shape, lo=-2.0, hi=2.0):
    """Argument maker piece: uniform values in ``[lo, hi)`` (real and imaginary parts both in
    that range for a complex dtype)."""
    return lambda rng, dtype: _draw(lambda s: rng.uniform(lo, hi, size=s), shape, dtype)


def normal(*shape):
    return lambda rng, dtype: _draw(lambda s: rng.standard_normal(size=s), shape, dtype)


def real_arg(piece):
    """An argument that stays real in a complex row (float32 for complex64, float64 for
    complex128), e.g. the parts of ``lax.complex(x, y)``."""
    def make(rng, dtype):
        dtype = jnp.dtype(dtype)
        return piece(rng, jnp.finfo(dtype).dtype if _is_complex(dtype) else dtype)
    return make


def const(value):
    """Argument maker piece: a fixed value (indices, or points at a kink); floating-point and
    complex values are cast to the case's dtype."""
    def make(rng, dtype):
        v = jnp.asarray(value)
        return v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.inexact) else v
    return make


def args(*pieces):
    """Combine argument-maker pieces into a ``make_args``."""
    return lambda rng, dtype: tuple(p(rng, dtype) for p in pieces)


def output_weights(fun, example_args, seed=0) -> list:
    """Fixed random weights, one array per output leaf of ``fun``: complex for complex outputs."""
    out_shapes = jax.eval_shape(fun, *example_args)
    rng = np.random.default_rng(seed)
    weights = []
    for s in jax.tree_util.tree_leaves(out_shapes):
        w = rng.standard_normal(s.shape)
        weights.append(w + 1j * rng.standard_normal(s.shape) if _is_complex(s.dtype) else w)
    return weights


def scalarize(fun, example_args, seed=0):
    """``loss(*a) = sum_k Re <w_k, fun(*a)_k>`` with fixed random weights ``w_k`` (complex for
    complex outputs, so ``grad(loss)`` is the VJP of the cotangents ``w_k``)."""
    weights = output_weights(fun, example_args, seed)

    def loss(*a):
        outs = jax.tree_util.tree_leaves(fun(*a))
        total = 0.0
        for o, w in zip(outs, weights):
            if jnp.issubdtype(o.dtype, jnp.inexact):
                total = total + jnp.real(jnp.sum(o * jnp.asarray(w, o.dtype))).astype(jnp.float64)
        return total
    return loss


def _assert_complex_vjp_parity(case: Case, a: tuple, tol: float) -> None:
    """``bpkit.vjp`` == ``jax.vjp`` (both jitted) with the fixed random cotangents (complex for
    complex outputs, float0 for integer ones), for the differentiated arguments."""
    def fun(*wrt):
        full = list(a)
        for i, x in zip(case.argnums, wrt):
            full[i] = x
        return case.fun(*full)

    primals = tuple(a[i] for i in case.argnums)
    out_shapes = jax.eval_shape(fun, *primals)
    cts = [jnp.asarray(w, s.dtype) if jnp.issubdtype(s.dtype, jnp.inexact)
           else np.zeros(s.shape, jax.dtypes.float0)
           for w, s in zip(output_weights(fun, primals), jax.tree_util.tree_leaves(out_shapes))]
    cts = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shapes), cts)
    got = jax.jit(lambda *p: bpkit.vjp(fun, *p)[1](cts))(*primals)
    want = jax.jit(lambda *p: jax.vjp(fun, *p)[1](cts))(*primals)
    _assert_trees_close(got, want, tol)


def _assert_trees_close(got, want, tol: float) -> None:
    """Leaf by leaf: equal dtypes, ``|got - want| <= tol * (|want| + 1e-3 + max |want|)``."""
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        scale = float(np.max(np.abs(y), initial=0))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol * (1e-3 + scale))


def assert_case_parity(case: Case, dtype: str, jit: bool) -> None:
    """Assert bpkit == jax.grad for ``case`` (and == float64 finite differences when eager)."""
    if case.context is not None:
        with case.context():
            return assert_case_parity(dataclasses.replace(case, context=None), dtype, jit)
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    a = case.make_args(rng, jnp.dtype(dtype))
    if _is_complex(dtype) and jit:
        _assert_complex_vjp_parity(case, a, case.rtol or bpkit.check.DEFAULT_TOLERANCES[dtype])
        return
    loss = scalarize(case.fun, a)
    if jit:
        g_bp = jax.jit(bpkit.grad(loss, case.argnums))(*a)
        g_jx = jax.jit(jax.grad(loss, case.argnums))(*a)
        _assert_trees_close(g_bp, g_jx, case.rtol or bpkit.check.DEFAULT_TOLERANCES[dtype])
    else:
        assert_parity(loss, *a, argnums=case.argnums,
                      fd=case.fd and dtype in ("float64", "complex128"), rtol=case.rtol)


def parametrize(cases):
    """pytest parameters: every case in float64 eagerly (with finite differences) and jitted,
    and in float32 jitted (float32 runs the same rule code as float64 eagerly; jit is where a
    dtype-specific problem would show). Complex rows run complex128 eagerly (finite
    differences) and complex64 jitted (the VJP with a complex cotangent). The runs named in a
    case's ``slow_modes`` are marked ``slow``."""
    import pytest
    modes = {"float64": (False, True), "complex128": (False,)}
    params = []
    for c in cases:
        for dt in c.dtypes:
            for jit in modes.get(dt, (True,)):
                mode = f"{dt}-{'jit' if jit else 'eager'}"
                slow = [pytest.mark.slow] if mode in c.slow_modes else []
                params.append(pytest.param(c, dt, jit, id=f"{c.name}-{mode}",
                                           marks=list(c.marks) + slow))
    return pytest.mark.parametrize("case,dtype,jit", params)

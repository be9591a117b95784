"""JAX's own autodiff test grids (``tests/rules/jax_grids.py``) run through ``bpkit.vjp``.

Each case compares ``bpkit.vjp`` with ``jax.vjp`` on random cotangents: first order in float32
and float64, and (as JAX's ``check_grads(order=2)`` does) the derivative of the pullback again,
in float64, up to the case's order. By default every ``DEFAULT_EVERY``-th case runs, a
representative spread over all families; ``pytest -m slow`` runs the whole grid.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bpkit
from bpkit.check import DEFAULT_TOLERANCES
from tests.rules.jax_grids import GRIDS, GridCase

DEFAULT_EVERY = 40


def _random_like(rng, tree):
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), tree)


def _nested_pullbacks(vjp, fun, cotangents):
    """``fun`` differentiated ``len(cotangents)`` times: each level is the previous level's
    pullback applied to its cotangent, as a function of the primals."""
    levels = [fun]
    for ct in cotangents:
        prev = levels[-1]
        levels.append(lambda *d, prev=prev, ct=ct: vjp(prev, *d)[1](ct))
    return levels[-1]


def check_grid_case(case: GridCase, dtype: str, order: int) -> float:
    """Assert ``bpkit.vjp`` == ``jax.vjp`` for ``case`` to ``order``; return the worst relative
    difference seen."""
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    full = case.make_args(rng, jnp.dtype(dtype))
    primals = [full[i] for i in case.argnums]

    def fun(*d):
        a = list(full)
        for i, x in zip(case.argnums, d):
            a[i] = x
        return case.fun(*a)

    # cotangents for each level, shaped like that level's outputs (taken from JAX)
    cotangents = []
    for _ in range(order):
        level = _nested_pullbacks(jax.vjp, fun, cotangents)
        cotangents.append(_random_like(rng, jax.eval_shape(level, *primals)))
    tol = case.rtol or DEFAULT_TOLERANCES[dtype]
    worst = 0.0
    for n in range(1, order + 1):
        got = jax.jit(_nested_pullbacks(bpkit.vjp, fun, cotangents[:n]))(*primals)
        want = jax.jit(_nested_pullbacks(jax.vjp, fun, cotangents[:n]))(*primals)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
            assert (np.isnan(g64) == np.isnan(w64)).all(), f"{case} {dtype} order {n}: nans differ"
            finite = ~np.isnan(w64)
            scale = float(np.max(np.abs(w64[finite]), initial=0.0))
            gf, wf = g64[finite], w64[finite]
            err = float(np.max(np.where(gf == wf, 0.0, np.abs(gf - wf)), initial=0.0))  # inf == inf
            worst = max(worst, err / max(scale, 1e-30))
            assert err <= tol * (scale + 1e-3), (
                f"{case} {dtype} order {n}: max |bpkit - jax| = {err:.3g} (scale {scale:.3g})")
    return worst


def _params():
    params = []
    for k, case in enumerate(GRIDS):
        marks = [] if k % DEFAULT_EVERY == 0 else [pytest.mark.slow]
        params.append(pytest.param(case, id=str(case), marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_jax_grid(case):
    check_grid_case(case, "float64", case.order)
    check_grid_case(case, "float32", 1)

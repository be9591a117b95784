"""Shared helpers for the nn/ops/models tests: float64 instances, scalarised losses, checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bpkit import nn
from bpkit.testing import assert_parity


def weights_like(shape, seed=0, dtype=jnp.float64):
    """Fixed random weights used to scalarise an output (every element gets its cotangent)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def scalar_loss(apply, out_shape, dtype=jnp.float64, seed=0):
    """``loss(params, x) = <w, apply(params, x)>`` with fixed random ``w``."""
    w = weights_like(out_shape, seed, dtype)

    def loss(params, x):
        return jnp.sum(apply(params, x) * w)
    return loss


def random_input(rng: np.random.Generator, shape, dtype=jnp.float64):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def check_parity_of(apply, params, x, *, wrt_x=True, directions=1, fd=True):
    """Parity of ``<w, apply(params, x)>`` w.r.t. params (and x when floating)."""
    out = jax.eval_shape(apply, params, x)
    loss = scalar_loss(apply, out.shape, out.dtype)
    argnums = (0, 1) if wrt_x and jnp.issubdtype(x.dtype, jnp.floating) else (0,)
    if not jax.tree_util.tree_leaves(params):
        argnums = (1,)
    return assert_parity(loss, params, x, argnums=argnums, directions=directions, fd=fd)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-6):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


def f64(tree):
    return nn.cast(tree, jnp.float64)

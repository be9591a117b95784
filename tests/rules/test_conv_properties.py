"""Property tests: bpkit.grad == jax.grad for random convolutions and poolings.

Random layouts, strides, paddings (negative and asymmetric included), dilations and groups for
``conv_general_dilated``; random windows, strides, paddings, base dilations and tie-heavy
inputs for sum/max/min pooling. float64, tiny shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

import bpkit

LAYOUTS = {
    1: [("NCH", "OIH", "NCH"), ("NHC", "HIO", "NHC")],
    2: [("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"), ("HNWC", "OHWI", "WHCN")],
    3: [("NCDHW", "OIDHW", "NCDHW"), ("NDHWC", "DHWIO", "NDHWC")],
}


def _canon_names(spec, kind):
    return ("N", "C") if kind == "lhs" else ("O", "I")


def _shape_in(spec, first, second, spatial, kind):
    """The shape in layout ``spec`` (like 'NHWC' or 'HWIO') given the batch/out-feature size,
    the feature/in-feature size and the spatial sizes in order."""
    a, b = _canon_names(spec, kind)
    it = iter(spatial)
    return tuple(first if c == a else second if c == b else next(it) for c in spec)


def _close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-9,
                                   atol=1e-12 * (1 + float(np.max(np.abs(w), initial=0))))


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    lhs_spec, rhs_spec, out_spec = draw(st.sampled_from(LAYOUTS[nd]))
    group_kind = draw(st.sampled_from(["none", "feature", "batch"]))
    groups = 1 if group_kind == "none" else draw(st.integers(1, 2 if nd == 3 else 3))
    fgc, bgc = (groups, 1) if group_kind == "feature" else (1, groups) if group_kind == "batch" else (1, 1)
    n = draw(st.integers(1, 2)) * bgc
    c_in = draw(st.integers(1, 2)) * fgc
    c_out = draw(st.integers(1, 2)) * groups
    max_n = {1: 7, 2: 5, 3: 3}[nd]
    spatial, kernel, strides, pads, ld, rd = [], [], [], [], [], []
    for _ in range(nd):
        size = draw(st.integers(1, max_n))
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        l_d = draw(st.integers(1, 2))
        r_d = draw(st.integers(1, 2))
        lo, hi = draw(st.integers(-1, 2)), draw(st.integers(-1, 2))
        length = (size - 1) * l_d + 1 + lo + hi
        assume(length >= (k - 1) * r_d + 1)
        spatial.append(size), kernel.append(k), strides.append(s), pads.append((lo, hi))
        ld.append(l_d), rd.append(r_d)
    x_shape = _shape_in(lhs_spec, n, c_in, spatial, "lhs")
    w_shape = _shape_in(rhs_spec, c_out, c_in // fgc, kernel, "rhs")
    kw = dict(window_strides=tuple(strides), padding=tuple(pads), lhs_dilation=tuple(ld),
              rhs_dilation=tuple(rd), dimension_numbers=(lhs_spec, rhs_spec, out_spec),
              feature_group_count=fgc, batch_group_count=bgc)
    return x_shape, w_shape, kw, draw(st.integers(0, 2 ** 31 - 1))


@settings(max_examples=15, deadline=None)
@given(conv_configs())
def test_conv_matches_jax(config):
    x_shape, w_shape, kw, seed = config
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, x_shape))
    w = jnp.asarray(rng.uniform(-1, 1, w_shape))
    out_shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, **kw), x, w).shape
    weights = jnp.asarray(rng.standard_normal(out_shape))

    def loss(x, w):
        return jnp.sum(lax.conv_general_dilated(x, w, **kw) * weights)

    # jitted: one compile per example, not one per op of each new shape (6x faster)
    _close(jax.jit(bpkit.grad(loss, (0, 1)))(x, w), jax.jit(jax.grad(loss, (0, 1)))(x, w))


OPS = {"add": (lax.add, 0.0), "max": (lax.max, -np.inf), "min": (lax.min, np.inf)}


@st.composite
def pool_configs(draw):
    nd = draw(st.integers(1, 2))
    op = draw(st.sampled_from(sorted(OPS)))
    shape, window, strides, pads, base = [2, 2], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]
    for _ in range(nd):
        size = draw(st.integers(1, 6))
        w = draw(st.integers(1, 3))
        s = draw(st.integers(1, 3))
        b = draw(st.sampled_from([1, 1, 2]))
        lo, hi = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        assume((size - 1) * b + 1 + lo + hi >= w)
        shape.append(size), window.append(w), strides.append(s), pads.append((lo, hi))
        base.append(b)
    ties = draw(st.booleans())
    return op, tuple(shape), tuple(window), tuple(strides), tuple(pads), tuple(base), ties, \
        draw(st.integers(0, 2 ** 31 - 1))


@settings(max_examples=15, deadline=None)
@given(pool_configs())
def test_pooling_matches_jax(config):
    op, shape, window, strides, pads, base, ties, seed = config
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape)
    x = jnp.asarray(np.round(x) if ties else x)  # ties: values in {-1, 0, 1}
    fn, init = OPS[op]

    def pool(x):
        return lax.reduce_window(x, init, fn, window, strides, pads, base)

    weights = jnp.asarray(rng.standard_normal(jax.eval_shape(pool, x).shape))

    def loss(x):
        return jnp.sum(pool(x) * weights)

    _close(jax.jit(bpkit.grad(loss))(x), jax.jit(jax.grad(loss))(x))

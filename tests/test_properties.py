"""Property tests (hypothesis): random shapes, dimension numbers and axes; bpkit.grad must
equal jax.grad (float64) for dot_general, broadcasting and reductions (ties included)."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import bpkit

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def assert_grads_equal(loss, args, argnums):
    got = jax.jit(bpkit.grad(loss, argnums))(*args)  # one compile, not one per op (3-6x faster)
    want = jax.jit(jax.grad(loss, argnums))(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def weighted(fun, out_shape, seed):
    """``sum(w * fun(...))`` with fixed random weights: every output element matters."""
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(out_shape))
    return lambda *a: jnp.sum(w * fun(*a))


# --- dot_general ----------------------------------------------------------------------------
@st.composite
def dot_general_problems(draw):
    size = st.integers(1, 3)
    nb, nc = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    nl, nr = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    batch = [draw(size) for _ in range(nb)]
    contract = [draw(size) for _ in range(nc)]
    lfree = [draw(size) for _ in range(nl)]
    rfree = [draw(size) for _ in range(nr)]
    # axis labels: ("b", i), ("c", i), ("f", i); each operand lists its labels in a random order
    lhs_labels = [("b", i) for i in range(nb)] + [("c", i) for i in range(nc)] + \
                 [("l", i) for i in range(nl)]
    rhs_labels = [("b", i) for i in range(nb)] + [("c", i) for i in range(nc)] + \
                 [("r", i) for i in range(nr)]
    lhs_labels = draw(st.permutations(lhs_labels))
    rhs_labels = draw(st.permutations(rhs_labels))
    sizes = {"b": batch, "c": contract, "l": lfree, "r": rfree}
    lhs_shape = tuple(sizes[k][i] for k, i in lhs_labels)
    rhs_shape = tuple(sizes[k][i] for k, i in rhs_labels)
    contract_order = draw(st.permutations(list(range(nc))))
    dims = ((tuple(lhs_labels.index(("c", i)) for i in contract_order),
             tuple(rhs_labels.index(("c", i)) for i in contract_order)),
            (tuple(lhs_labels.index(("b", i)) for i in range(nb)),
             tuple(rhs_labels.index(("b", i)) for i in range(nb))))
    return lhs_shape, rhs_shape, dims, draw(st.integers(0, 2 ** 16))


@SETTINGS
@given(dot_general_problems())
def test_dot_general_any_dimension_numbers(problem):
    lhs_shape, rhs_shape, dims, seed = problem
    rng = np.random.default_rng(seed)
    lhs, rhs = jnp.asarray(rng.standard_normal(lhs_shape)), jnp.asarray(rng.standard_normal(rhs_shape))
    out_shape = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dims), lhs, rhs).shape
    loss = weighted(lambda a, b: lax.dot_general(a, b, dims), out_shape, seed)
    assert_grads_equal(loss, (lhs, rhs), (0, 1))


# --- broadcasting ---------------------------------------------------------------------------
@st.composite
def broadcast_problems(draw):
    out_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=4)))
    kept = sorted(draw(st.sets(st.sampled_from(range(len(out_shape))), max_size=len(out_shape)))
                  if out_shape else [])
    operand_shape = tuple(out_shape[d] if draw(st.booleans()) else 1 for d in kept)
    return operand_shape, out_shape, tuple(kept), draw(st.integers(0, 2 ** 16))


@SETTINGS
@given(broadcast_problems())
def test_broadcast_in_dim(problem):
    operand_shape, out_shape, dims, seed = problem
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(operand_shape))
    loss = weighted(lambda x: lax.broadcast_in_dim(x, out_shape, dims), out_shape, seed + 1)
    assert_grads_equal(loss, (x,), 0)


@st.composite
def stretch_problems(draw):
    full = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    a = tuple(d if draw(st.booleans()) else 1 for d in full)
    b = tuple(d if draw(st.booleans()) else 1 for d in full)
    op = draw(st.sampled_from(["add", "subtract", "multiply", "divide", "maximum", "minimum",
                              "arctan2", "power"]))
    scalar = draw(st.sampled_from([None, "lhs", "rhs"]))
    if scalar == "lhs":
        a = ()
    elif scalar == "rhs":
        b = ()
    return a, b, op, draw(st.integers(0, 2 ** 16))


@SETTINGS
@given(stretch_problems())
def test_binary_ops_stretch_size_one_axes(problem):
    a_shape, b_shape, op, seed = problem
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.uniform(0.5, 2.0, a_shape))
    b = jnp.asarray(np.round(rng.uniform(0.5, 2.0, b_shape), 0))  # ties with a for max/min
    fun = getattr(jnp, op)
    out_shape = jax.eval_shape(fun, a, b).shape
    assert_grads_equal(weighted(fun, out_shape, seed), (a, b), (0, 1))


# --- reductions -----------------------------------------------------------------------------
@st.composite
def reduction_problems(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    axes = tuple(sorted(draw(st.sets(st.sampled_from(range(len(shape))), min_size=1))))
    op = draw(st.sampled_from(["sum", "max", "min", "prod"]))
    ties = draw(st.booleans())
    return shape, axes, op, ties, draw(st.integers(0, 2 ** 16))


@SETTINGS
@given(reduction_problems())
def test_reductions_random_axes(problem):
    shape, axes, op, ties, seed = problem
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: extrema tie, products hit zeros
        x = jnp.asarray(rng.integers(-1, 3, shape).astype(np.float64))
    else:
        x = jnp.asarray(rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape))
    fun = lambda x: getattr(jnp, op)(x, axis=axes)  # noqa: E731
    out_shape = jax.eval_shape(fun, x).shape
    assert_grads_equal(weighted(fun, out_shape, seed), (x,), 0)


@SETTINGS
@given(reduction_problems(), st.booleans())
def test_cumulative_reductions(problem, reverse):
    shape, axes, op, ties, seed = problem
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(0.5, 1.5, shape))  # cummax/cummin are only compared off ties
    cum = {"sum": lax.cumsum, "max": lax.cummax, "min": lax.cummin, "prod": lax.cumprod}[op]
    fun = lambda x: cum(x, axis=axes[0], reverse=reverse)  # noqa: E731
    assert_grads_equal(weighted(fun, shape, seed), (x,), 0)

"""Parity table for bpkit/rules/collectives.py, row for row, plus explicit-SPMD programs.

Every case runs a ``jax.shard_map`` on the simulated CPU devices of tests/conftest.py (a mesh
of 4, or 2 x 4), with replication checked (``check_vma=True``, JAX's default) and unchecked
(``check_vma=False``, where JAX divides and psums cotangents itself) where both are allowed.
The composites are the two ways large models are written by hand: a data-parallel MLP step
(gradients pmean'd over the data axis) and a Megatron-style tensor-parallel MLP (column-split
then row-split weights, one psum), and ``jax.pmap`` of a per-device loss.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import bpkit
from bpkit.check.coverage import primitives_in_jaxpr
from bpkit.engine.registry import UnsupportedPrimitiveError
from tests.rules.harness import Case, args, assert_case_parity, normal, parametrize, uniform

DEVICES = np.array(jax.devices()[:8])
MESH = Mesh(DEVICES[:4], ("i",))
MESH_2D = Mesh(DEVICES.reshape(2, 4), ("a", "b"))
RING = [(k, (k + 1) % 4) for k in range(4)]


def smap(body, in_specs, out_specs, *, check=True, mesh=MESH, jit=True, **kwargs):
    """``jax.shard_map``, jitted by default: an unjitted shard_map runs its body one operation
    at a time, which makes jax.grad's reference and finite differences slow (bpkit compiles
    its forward and backward shard_maps either way; ``jit=False`` tests that path)."""
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=check, **kwargs)
    return jax.jit(mapped) if jit else mapped


def on_shards(body, out_spec, check):
    """``f(x, w)``: ``x`` split over ``i``, ``w`` replicated; ``body(x_shard, w)``."""
    return smap(body, (P("i"), P()), out_spec, check=check)


def _local(x, w):
    return jnp.sin(x) * w  # a varying value that depends on both inputs


# --- psum, psum_invariant, pvary ----------------------------------------------------------------
psum_unchecked = on_shards(lambda x, w: lax.psum(_local(x, w), "i"), P(), False)
psum_positional = on_shards(lambda x, w: lax.psum(_local(x, w), ("i", 0)), P(), False)
psum_checked = on_shards(lambda x, w: lax.psum(_local(x, w), "i"), P(), True)
pmean_checked = on_shards(lambda x, w: lax.pmean(_local(x, w), "i") * w, P(), True)
pvary_replicated = on_shards(lambda x, w: jnp.tanh(w) * x, P("i"), True)  # pvary(w) inside


# --- gathers and scatters -----------------------------------------------------------------------
def _gather_body(tiled, axis, to="varying"):
    def body(x, w):
        g = lax.all_gather(_local(x, w), "i", axis=axis, tiled=tiled, to=to)
        return jnp.cos(g) if to == "varying" else jnp.sum(g ** 2)[None]
    return body


all_gather_tiled = on_shards(_gather_body(True, 0), P("i"), True)
all_gather_stacked = on_shards(_gather_body(False, 1), P("i"), False)
all_gather_invariant = on_shards(_gather_body(True, 0, "invarying"), P(), True)


def _scatter_body(tiled):
    def body(x, w):
        pieces = [jnp.sin(x) * w, jnp.cos(x) * w, x * w, x]  # four blocks of 2 per shard
        full = jnp.concatenate(pieces if tiled else [q[None] for q in pieces])
        return lax.psum_scatter(full, "i", scatter_dimension=0, tiled=tiled)  # block k -> k
    return body


psum_scatter_tiled = on_shards(_scatter_body(True), P("i"), True)
psum_scatter_stacked = on_shards(_scatter_body(False), P("i"), False)


# --- permutations -------------------------------------------------------------------------------
ppermute_ring = on_shards(lambda x, w: lax.ppermute(_local(x, w), "i", RING) * x, P("i"), True)
ppermute_partial = on_shards(  # shards 0 and 3 receive nothing (zeros)
    lambda x, w: lax.ppermute(_local(x, w), "i", [(0, 1), (3, 2)]), P("i"), False)
all_to_all_tiled = smap(
    lambda x, w: lax.all_to_all(jnp.sin(x) * w[None, :], "i", 0, 1, tiled=True),
    (P("i"), P()), P("i"))
all_to_all_stacked = smap(  # untiled with split_axis == concat_axis (see the test below)
    lambda x, w: lax.all_to_all(jnp.sin(x) * w[None, :], "i", 0, 0, tiled=False) ** 2,
    (P("i"), P()), P("i"), check=False)


def _pbroadcast_body(x):  # a scalar: JAX's own transpose (lax.full_like) needs one
    return lax.pbroadcast(jnp.sum(jnp.sin(x)), "i", 0) * x


pbroadcast_one_device = smap(_pbroadcast_body, P("i"), P("i"), mesh=Mesh(DEVICES[:1], ("i",)))


# --- not differentiable -------------------------------------------------------------------------
axis_index_scaled = on_shards(
    lambda x, w: _local(x, w) * (1 + lax.axis_index("i")).astype(x.dtype), P("i"), True)


# --- shard_map: specs, replication, meshes, nesting ---------------------------------------------
replicated_out_unchecked = smap(  # replicated outputs, unchecked: JAX divides their ct by 4
    lambda x, w: (lax.psum(_local(x, w), "i"), jnp.tanh(w) * w), (P("i"), P()), (P(), P()),
    check=False)
two_d_mesh = smap(
    lambda x, w: (lax.psum(jnp.sin(x) * w[None, :], "a"), lax.psum(x * w[None, :], ("a", "b"))),
    (P("a", "b"), P()), (P(None, "b"), P()), mesh=MESH_2D)
two_d_mesh_unchecked = smap(
    lambda x, w: (lax.psum(jnp.sin(x) * w[None, :], "a"), lax.psum(x * w[None, :], ("a", "b"))),
    (P("a", "b"), P()), (P(None, "b"), P()), mesh=MESH_2D, check=False)
partial_manual = smap(  # manual over b only; a stays automatic
    lambda x, w: lax.psum(jnp.sin(x) * w, "b"), (P("b"), P()), P(), mesh=MESH_2D,
    axis_names={"b"})


def _nested_body(x, w):
    h = jax.jit(lambda a: jnp.tanh(a * w))(x)
    init = lax.pcast(jnp.ones_like(w), "i", to="varying")
    c, _ = lax.scan(lambda c, a: (c * a + w, None), init, h.reshape(1, 2))
    # The predicate is replicated: with a per-shard predicate and a replicated operand in a
    # branch, jax.grad itself deadlocks (the transposed pvary is a psum inside one branch).
    c = lax.cond(jnp.sum(w) > 0, lambda c: c * w, lambda c: jnp.cos(c), c)
    return lax.psum(jax.checkpoint(lambda c: jnp.sin(c) ** 2)(c), "i")


nested_jit_scan_cond_remat = on_shards(_nested_body, P(), True)
integer_input = smap(lambda x, k: x * k.astype(x.dtype) + lax.axis_index("i").astype(x.dtype),
                     (P("i"), P("i")), P("i"))


def _with_ints(x, w):
    return integer_input(x, jnp.arange(8)) * w[0]


_pmap_loss = jax.pmap(lambda w, x: lax.pmean(jnp.sum(jnp.tanh(x @ w)), "d"), axis_name="d",
                      in_axes=(None, 0))  # a shard_map under jit on every supported release


F64 = ("float64",)  # float32 runs on one case per collective: the rules never touch dtypes
XW = args(uniform(8), uniform(2))  # x split over the 4 shards, w replicated
XW_2D = args(uniform(4, 8), uniform(2))
XW_A2A = args(uniform(16, 4), uniform(4))
BOTH = (0, 1)

CASES = [
    # psum, psum_invariant, pvary
    Case("psum_unchecked", psum_unchecked, XW, BOTH, dtypes=F64),
    Case("psum_positional_axes", psum_positional, XW, BOTH, dtypes=F64),
    Case("psum_invariant", psum_checked, XW, BOTH),
    Case("pmean", pmean_checked, XW, BOTH, dtypes=F64),
    Case("pvary_replicated_input", pvary_replicated, XW, BOTH, dtypes=F64),
    # gathers and scatters
    Case("all_gather_tiled", all_gather_tiled, XW, BOTH),
    Case("all_gather_stacked_axis1", all_gather_stacked, XW, BOTH, dtypes=F64),
    Case("all_gather_invariant", all_gather_invariant, XW, BOTH, dtypes=F64),
    Case("psum_scatter_tiled", psum_scatter_tiled, XW, BOTH),
    Case("psum_scatter_stacked", psum_scatter_stacked, XW, BOTH, dtypes=F64),
    # permutations
    Case("ppermute_ring", ppermute_ring, XW, BOTH),
    Case("ppermute_partial", ppermute_partial, XW, BOTH, dtypes=F64),
    Case("all_to_all_tiled", all_to_all_tiled, XW_A2A, BOTH),
    Case("all_to_all_stacked", all_to_all_stacked, XW_A2A, BOTH, dtypes=F64),
    Case("pbroadcast", pbroadcast_one_device, args(uniform(3)),
         marks=(pytest.mark.skipif(jax.default_backend() != "gpu",
                                   reason="XLA lowers the collective broadcast on GPU only"),)),
    # not differentiable
    Case("axis_index", axis_index_scaled, XW, BOTH, dtypes=F64),
    # shard_map
    Case("shard_map_replicated_out_unchecked", replicated_out_unchecked, XW, BOTH, dtypes=F64),
    Case("shard_map_2d_mesh", two_d_mesh, XW_2D, BOTH, dtypes=F64),
    Case("shard_map_2d_mesh_unchecked", two_d_mesh_unchecked, XW_2D, BOTH, dtypes=F64),
    Case("shard_map_partial_manual", partial_manual, XW, BOTH, dtypes=F64),
    Case("shard_map_nested_jit_scan_cond_remat", nested_jit_scan_cond_remat, XW, BOTH,
         dtypes=F64),
    Case("shard_map_integer_input", _with_ints, XW, BOTH, dtypes=F64),
    Case("pmap", _pmap_loss, args(normal(3, 2), normal(4, 5, 3)), BOTH),
]


@parametrize(CASES)
def test_collectives_parity(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


# --- refusals, and an all_to_all JAX itself cannot differentiate ------------------------------
@pytest.mark.parametrize("collective", [lax.pmax, lax.pmin])
def test_pmax_pmin_are_refused_like_jax(collective):
    f = on_shards(lambda x, w: collective(_local(x, w), "i"), P(), True)
    x, w = jnp.linspace(-1.0, 1.0, 8), jnp.array([0.5, -1.5])
    with pytest.raises(NotImplementedError):  # JAX has no rule either
        jax.grad(lambda x: jnp.sum(f(x, w)))(x)
    with pytest.raises(UnsupportedPrimitiveError, match="stop_gradient"):
        bpkit.grad(lambda x: jnp.sum(f(x, w)))(x)


def test_pmax_behind_stop_gradient_is_fine():
    """The usual use of pmax: the shift of a numerically stable softmax across shards."""
    def body(x):
        shift = lax.pmax(lax.stop_gradient(jnp.max(x)), "i")
        e = jnp.exp(x - shift)
        return e / lax.psum(jnp.sum(e), "i")
    f = smap(body, P("i"), P("i"))
    x = jnp.linspace(-2.0, 3.0, 8)
    loss = lambda x: jnp.sum(f(x) * jnp.arange(8.0))  # noqa: E731
    _close(bpkit.grad(loss)(x), jax.jit(jax.grad(loss))(x))


@pytest.mark.parametrize("check", [True, False])
def test_pbroadcast_backward_traces_on_cpu(check):
    """XLA lowers pbroadcast on GPU only, so on CPU its rule is checked by tracing: the
    gradient has the input's type, and is a psum selected on the source shard. (jax.grad
    cannot trace this one: its transpose calls lax.full_like with a non-scalar fill value.)"""
    f = smap(lambda x: lax.pbroadcast(jnp.sin(x), "i", 1) * x, P("i"), P("i"), check=check)
    x = jnp.linspace(-1.0, 1.0, 8)
    grad_jaxpr = jax.make_jaxpr(bpkit.grad(lambda x: jnp.sum(f(x) ** 2)))(x)
    assert grad_jaxpr.out_avals[0].shape == x.shape
    used = primitives_in_jaxpr(grad_jaxpr)
    assert {"axis_index", "select_n", "psum_invariant" if check else "psum"} <= used


def test_untiled_all_to_all_between_different_axes():
    """``all_to_all(x, split_axis=1, concat_axis=0, tiled=False)``: jax.grad fails on it
    ("Expected cotangent type f64[1,4,4] but got f64[4,1,4]": its transpose goes through the
    ``lax.all_to_all`` wrapper, which reshapes again). bpkit transposes the primitive; the
    reference is jax.grad of the same map written as a tiled all_to_all."""
    untiled = smap(lambda x: jnp.sin(lax.all_to_all(x, "i", 1, 0, tiled=False)), P("i"),
                   P("i"))
    tiled = smap(lambda x: jnp.sin(lax.all_to_all(x[None], "i", 2, 0, tiled=True)[:, :, 0]),
                 P("i"), P("i"))
    rng = np.random.default_rng(3)
    x, w = (jnp.asarray(rng.normal(size=(16, 4))) for _ in range(2))
    _close(untiled(x), tiled(x))
    _close(bpkit.grad(lambda x: jnp.sum(untiled(x) * w))(x),
           jax.jit(jax.grad(lambda x: jnp.sum(tiled(x) * w)))(x))


# --- composites: data-parallel and tensor-parallel MLP steps, written with shard_map ------------
def _mlp_params(rng, d_in=3, d_hidden=8, d_out=2):
    return {"w1": jnp.asarray(rng.normal(size=(d_in, d_hidden)) / 2),
            "b1": jnp.asarray(rng.normal(size=(d_hidden,)) / 4),
            "w2": jnp.asarray(rng.normal(size=(d_hidden, d_out)) / 2)}


def _mlp_loss(p, x, y):
    h = jax.nn.gelu(x @ p["w1"] + p["b1"][None, :])
    return jnp.mean((h @ p["w2"] - y) ** 2)


def _data_parallel_step(grad, lr=0.1):
    """One SGD step: each shard differentiates its own batch slice; gradients are pmean'd."""
    def body(p, x, y):
        g = jax.tree_util.tree_map(lambda t: lax.pmean(t, "i"), grad(_mlp_loss)(p, x, y))
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g), g
    return smap(body, (P(), P("i"), P("i")), (P(), P()), check=False)


def _megatron_mlp(w1, b1, w2, x, y):
    """Per shard: ``w1`` split by columns (and ``b1`` with it), ``w2`` by rows; each shard
    computes its slice of the hidden layer, and one psum adds the partial outputs."""
    out = lax.psum(jax.nn.gelu(x @ w1 + b1[None, :]) @ w2, "i")
    return jnp.mean((out - y) ** 2)


_megatron = smap(_megatron_mlp, (P(None, "i"), P("i"), P("i", None), P(), P()), P(), jit=False)


def _tensor_parallel_loss(p, x, y):
    return _megatron(p["w1"], p["b1"], p["w2"], x, y)


def _close(a, b, rtol=1e-10):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=rtol * 1e-2)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(12)
    return (_mlp_params(rng), jnp.asarray(rng.normal(size=(16, 3))),
            jnp.asarray(rng.normal(size=(16, 2))))


def test_data_parallel_mlp_step(batch):
    """bpkit.grad inside the shard_map body (the train step is jitted, as in practice)."""
    p, x, y = batch
    new_bp, g_bp = jax.jit(_data_parallel_step(bpkit.grad))(p, x, y)
    new_jx, g_jx = jax.jit(_data_parallel_step(jax.grad))(p, x, y)
    _close(g_bp, g_jx)
    _close(new_bp, new_jx)
    _close(g_bp, jax.grad(_mlp_loss)(p, x, y))  # equal shards: the pmean is the full gradient


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_data_parallel_loss_differentiated_through_shard_map(batch, jit):
    """The other spelling: the loss is a pmean over shards, the gradient is taken outside
    (eagerly: the shard_map is not under jit)."""
    p, x, y = batch
    loss = smap(lambda p, x, y: lax.pmean(_mlp_loss(p, x, y), "i"), (P(), P("i"), P("i")), P(),
                jit=False)
    g_bp = (jax.jit(bpkit.grad(loss)) if jit else bpkit.grad(loss))(p, x, y)
    _close(g_bp, jax.jit(jax.grad(loss))(p, x, y))
    _close(g_bp, jax.grad(_mlp_loss)(p, x, y))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_tensor_parallel_mlp_step(batch, jit):
    p, x, y = batch
    g_bp = (jax.jit(bpkit.grad(_tensor_parallel_loss)) if jit
            else bpkit.grad(_tensor_parallel_loss))(p, x, y)
    _close(g_bp, jax.jit(jax.grad(_tensor_parallel_loss))(p, x, y))
    _close(g_bp, jax.grad(_mlp_loss)(p, x, y))  # the split MLP is the same MLP


def test_data_and_tensor_parallel_on_a_2d_mesh(batch):
    """Both at once on a (data=2, model=4) mesh: batch split over ``a``, hidden layer over
    ``b``; the loss is pmean'd over data and the partial outputs psum'd over model."""
    p, x, y = batch

    def body(w1, b1, w2, x, y):
        out = lax.psum(jax.nn.gelu(x @ w1 + b1[None, :]) @ w2, "b")
        return lax.pmean(jnp.mean((out - y) ** 2), "a")

    f = smap(body, (P(None, "b"), P("b"), P("b", None), P("a"), P("a")), P(), mesh=MESH_2D)
    loss = lambda p, x, y: f(p["w1"], p["b1"], p["w2"], x, y)  # noqa: E731
    g_bp = jax.jit(bpkit.grad(loss))(p, x, y)
    _close(g_bp, jax.jit(jax.grad(loss))(p, x, y))
    _close(g_bp, jax.grad(_mlp_loss)(p, x, y))


def test_gradient_inside_a_checked_shard_map_is_summed_like_jax(batch):
    """With ``check_vma=True`` the gradient of a replicated parameter taken inside the body is
    already summed over the shards (its cotangent passes through ``pvary``), as with jax.grad."""
    p, x, y = batch

    def step(grad):
        return smap(lambda p, x, y: grad(_mlp_loss)(p, x, y), (P(), P("i"), P("i")), P())

    _close(step(bpkit.grad)(p, x, y), step(jax.grad)(p, x, y))


def test_explicit_mesh_axes():
    """Meshes made by ``jax.make_mesh`` have explicit axes: shard_map then takes the mesh from
    the context and its inputs carry their shardings in their types."""
    mesh = jax.make_mesh((4,), ("i",))
    with jax.set_mesh(mesh):
        f = jax.shard_map(lambda x, w: lax.psum(jnp.sin(x) * w, "i"), in_specs=(P("i"), P()),
                          out_specs=P())
        x = jax.device_put(jnp.linspace(-1.0, 1.0, 8), P("i"))
        w = jax.device_put(jnp.array([0.5, -1.5]), P())
        loss = lambda x, w: jnp.sum(f(x, w) ** 2)  # noqa: E731
        _close(bpkit.grad(loss, (0, 1))(x, w), jax.jit(jax.grad(loss, (0, 1)))(x, w))

"""bpkit never uses JAX's own differentiation machinery.

With JAX's JVP tracing, linearization, transpose rules, backward pass and the public
jax.grad/vjp/jvp/linearize/linear_transpose all made to raise, bpkit still differentiates a set
of realistic programs, and its gradients equal jax.grad's (computed before patching).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from jax._src.interpreters import ad
from jax._src.interpreters import partial_eval as pe
from jax.ad_checkpoint import checkpoint_name

import bpkit
from bpkit import nn as bpkit_nn
from bpkit.engine import registry


class JaxAutodiffUsed(AssertionError):
    """JAX's differentiation machinery was reached while it was forbidden."""


def _forbidden(name):
    def fail(*args, **kwargs):
        raise JaxAutodiffUsed(f"JAX's {name} was called")
    return fail


class ForbiddenRules(dict):
    """A rule table that refuses every lookup (but still accepts registrations)."""

    def __init__(self, name, original):
        super().__init__(original)
        self.name = name

    def __getitem__(self, key):
        raise JaxAutodiffUsed(f"JAX's {self.name}[{key}] was looked up")

    def get(self, key, default=None):
        raise JaxAutodiffUsed(f"JAX's {self.name}.get({key}) was looked up")

    def __contains__(self, key):
        raise JaxAutodiffUsed(f"JAX's {self.name} was searched for {key}")


def forbid_jax_autodiff(monkeypatch):
    for cls, methods in ((ad.JVPTrace, ("process_primitive", "process_custom_jvp_call",
                                        "process_custom_vjp_call")),
                         (ad.LinearizeTrace, ("process_primitive", "process_custom_jvp_call",
                                              "process_custom_vjp_call"))):
        for m in methods:
            if hasattr(cls, m):
                monkeypatch.setattr(cls, m, _forbidden(f"{cls.__name__}.{m}"))
    for fn in ("backward_pass", "backward_pass3", "closed_backward_pass", "linearize",
               "linearize_jaxpr", "_linearize_jaxpr", "linearize_from_jvp",
               "fallback_linearize_rule"):
        if hasattr(ad, fn):
            monkeypatch.setattr(ad, fn, _forbidden(f"ad.{fn}"))
    for table in ("primitive_jvps", "primitive_transposes", "primitive_linearizations",
                  "fancy_transposes", "reducing_transposes"):
        if hasattr(ad, table):
            monkeypatch.setattr(ad, table, ForbiddenRules(table, getattr(ad, table)))
    for fn in ("grad", "value_and_grad", "vjp", "jvp", "linearize", "linear_transpose",
               "jacfwd", "jacrev", "hessian"):
        monkeypatch.setattr(jax, fn, _forbidden(f"jax.{fn}"))
    # JAX's partial evaluation, which splits a checkpointed function by its policy.
    for fn in ("partial_eval_jaxpr_custom", "partial_eval_jaxpr_nounits"):
        monkeypatch.setattr(pe, fn, _forbidden(f"pe.{fn}"))
    monkeypatch.setattr(pe, "partial_eval_jaxpr_custom_rules",
                        ForbiddenRules("partial_eval_jaxpr_custom_rules",
                                       pe.partial_eval_jaxpr_custom_rules))


# --- the programs -------------------------------------------------------------------------------
def _normal(seed, shape, scale=0.5):
    """float64 normal draws, made by NumPy (no compile per shape while the module loads)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)


K = jax.random.split(jax.random.key(0), 16)


def mlp(p, x, y):
    h = jax.nn.relu(x @ p["w1"] + p["b1"][None, :])
    h = jax.nn.gelu(h @ p["w2"])
    logits = h @ p["w3"]
    onehot = jax.nn.one_hot(y, 3, dtype=logits.dtype)
    return (jnp.mean(optax.softmax_cross_entropy(logits, onehot))
            - jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)) * 0.5)


MLP_ARGS = ({"w1": _normal(0, (4, 8)), "b1": _normal(1, (8,)), "w2": _normal(2, (8, 8)),
             "w3": _normal(3, (8, 3))}, _normal(104, (6, 4), 1.0),  # every row has live units
            jnp.array([0, 1, 2, 1, 0, 2]))


def gru(p, xs):
    def cell(h, x):
        zr = jax.nn.sigmoid(x @ p["wx"][:, :8] + h @ p["wh"][:, :8])
        z, r = zr[:, :4], zr[:, 4:]
        n = jnp.tanh(x @ p["wx"][:, 8:] + (r * h) @ p["wh"][:, 8:])
        h = (1 - z) * n + z * h
        return h, h
    h, hs = lax.scan(cell, jnp.zeros((2, 4)), xs)
    return jnp.sum(hs ** 2) + jnp.sum(h)


GRU_ARGS = ({"wx": _normal(5, (3, 12)), "wh": _normal(6, (4, 12))},
            _normal(7, (5, 2, 3), 1.0))


def with_cond(x, y):
    return lax.cond(jnp.sum(x) > 0, lambda a: jnp.sum(jnp.sin(a) * y), lambda a: jnp.sum(a * a), x)


@jax.custom_vjp
def _scaled_tanh(x):
    return jnp.tanh(x)


_scaled_tanh.defvjp(lambda x: (jnp.tanh(x), jnp.tanh(x)), lambda t, ct: (ct * (1 - t * t),))


def remat_and_custom_vjp(w, x):
    block = jax.checkpoint(lambda w, x: _scaled_tanh(x @ w) @ w.T)
    return jnp.sum(block(w, block(w, x)) ** 2)


def remat_policies(w, x):
    """Per-block checkpoints that save dots (one inside jnp.einsum's jit) or a named value."""
    def block(w, x):
        h = checkpoint_name(jnp.tanh(x @ w), "h")
        return jnp.einsum("bi,ij->bj", h, w.T) * h
    cp = jax.checkpoint_policies
    for policy in (cp.dots_with_no_batch_dims_saveable, cp.save_only_these_names("h")):
        x = jax.checkpoint(block, policy=policy)(w, x)
    return jnp.sum(x ** 2)


def cnn(p, x):
    y = lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y)
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    y = lax.reduce_window(y, 0.0, lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "VALID") / 4
    return jnp.sum(y ** 2)


CNN_ARGS = ({"k": _normal(8, (3, 3, 2, 4))}, _normal(9, (2, 8, 8, 2), 1.0))


def embedding(table, ids, w):
    e = table[ids]  # gather, repeated ids
    return jnp.sum(jnp.tanh(e @ w))


EMB_ARGS = (_normal(10, (10, 4)), jnp.array([[1, 3, 3], [0, 1, 9]]), _normal(11, (4, 2)))

def linalg_program(a, b):
    """Factorizations and solves: Cholesky + cho_solve (triangular solves), eigh, QR, LU, SVD,
    and conjugate gradients (a symmetric custom_linear_solve). ``jnp.linalg.solve`` is not here:
    JAX builds its transposed operator with ``jax.linear_transpose`` while tracing the primal."""
    k = a @ a.T + 3 * jnp.eye(3)
    alpha = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(k), True), b)
    w, v = jnp.linalg.eigh(k)
    q, r = jnp.linalg.qr(a)
    x, _ = jax.scipy.sparse.linalg.cg(lambda u: k @ u, b, tol=1e-12)
    return (jnp.sum(alpha * b) + jnp.sum(w ** 2) + jnp.sum(v ** 4) + jnp.sum(jnp.sin(q) * r)
            + jnp.sum(lax.linalg.lu(a)[0] ** 2) + jnp.sum(jnp.linalg.svd(a, compute_uv=False))
            + jnp.sum(x ** 2))
_MESH = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("i",))


def _spmd_body(w, x):
    h = jnp.tanh(x @ w)  # w replicated (pvary inside), x split over the batch
    ring = lax.ppermute(h, "i", [(k, (k + 1) % 4) for k in range(4)])
    gathered = lax.all_gather(ring * h, "i", tiled=True)
    mine = lax.psum_scatter(gathered ** 2, "i", tiled=True)
    return lax.pmean(jnp.sum(mine) + jnp.sum(h), "i")


# Explicit SPMD: a shard_map whose body calls collectives (psum/pvary, all_gather, psum_scatter,
# ppermute); jitted, as train steps are (an unjitted shard_map runs op by op).
spmd = jax.jit(jax.shard_map(_spmd_body, mesh=_MESH, in_specs=(P(), P("i")), out_specs=P()))

def spectral_complex(w_re, w_im, x):
    """FFT spectral filter with complex weights, complex abs/conj/real/imag, special functions."""
    w = lax.complex(w_re, w_im)
    y = jnp.fft.irfft(jnp.fft.rfft(x) * w[None], n=x.shape[-1])
    z = jnp.fft.fft(y)
    special = jax.scipy.special.i0e(y) + jax.scipy.special.betainc(2.0, 3.0, jax.nn.sigmoid(y))
    return jnp.sum(jnp.abs(z) + jnp.real(z * jnp.conj(z)) * 0.1 + jnp.imag(z) ** 2 + special)


SPECTRAL_ARGS = (_normal(0, (5,)), _normal(1, (5,)), _normal(2, (2, 8), 1.0))


def misc_primitives(x, w):
    """Rules of branch misc: checkpoint_name, optimization_barrier, tile, a variadic
    lax.reduce, ragged_dot and a dynamic_slice with a negative start."""
    from jax._src.lax import lax as lax_internal
    from jax.ad_checkpoint import checkpoint_name

    h, = lax.optimization_barrier((checkpoint_name(jnp.tanh(x), "h"),))
    t = lax_internal.tile(h, (2, 1))
    total, prod = lax.reduce((t, t * 0.5), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]),
                             (0,))
    r = lax.ragged_dot(t, w, jnp.array([3, 5], jnp.int32))
    d = lax.dynamic_slice_p.bind(x, jnp.int32(-1), jnp.int32(0), slice_sizes=(2, 2))
    return jnp.sum(total * prod) + jnp.sum(r ** 2) + jnp.sum(d ** 3)


_CROSS = bpkit_nn.cross_attention(2)


def cross_attention(params, x, memory):
    """The encoder-decoder's cross-attention (the fused attention's hand-written backward)."""
    return jnp.sum(jnp.tanh(_CROSS.apply(params, x, memory=memory)))


CROSS_ARGS = (bpkit_nn.cast(_CROSS.init(K[2], (3, 4))[0], jnp.float64),
              _normal(3, (2, 3, 4), 1.0), _normal(4, (2, 5, 4), 1.0))


PROGRAMS = {
    "mlp_relu_gelu_softmax_ce": (mlp, MLP_ARGS, 0, None),
    "gru_scan": (gru, GRU_ARGS, 0, None),
    "cond": (with_cond, (_normal(12, (5,)), _normal(13, (5,))), (0, 1), None),
    "remat_custom_vjp": (remat_and_custom_vjp, (_normal(14, (3, 3)), _normal(15, (2, 3))),
                         (0, 1), None),
    "remat_policies": (remat_policies, (_normal(14, (3, 3)), _normal(15, (2, 3))),
                       (0, 1), None),
    "cnn_conv_pooling": (cnn, CNN_ARGS, (0, 1), (lax.conv_general_dilated_p,
                                                  lax.reduce_window_max_p)),
    "embedding_gather": (embedding, EMB_ARGS, (0, 2), (lax.gather_p,)),
    "linalg_decompositions": (linalg_program, (_normal(0, (3, 3), 1.0), _normal(1, (3,))),
                              (0, 1), (lax.linalg.cholesky_p, lax.linalg.eigh_p, lax.linalg.svd_p)),
    "cross_attention": (cross_attention, CROSS_ARGS, (0, 1, 2), None),
    "shard_map_collectives": (spmd, (_normal(0, (3, 2)), _normal(1, (8, 3), 1.0)), (0, 1),
                              None),
    "fft_complex_special": (spectral_complex, SPECTRAL_ARGS, (0, 1, 2), (lax.fft_p,)),
    "misc_primitives": (misc_primitives, (_normal(16, (4, 3)),
                                          _normal(17, (2, 3, 2))),
                        (0, 1), None),
}

# References, computed now, before anything is patched; jitted, as one compile per program
# (eagerly, each new shape of every primitive compiled apart: 28 s of each worker's collection).
REFERENCE = {name: jax.jit(jax.grad(f, argnums))(*args)
             for name, (f, args, argnums, _) in PROGRAMS.items()}


@pytest.fixture
def no_jax_autodiff(monkeypatch):
    forbid_jax_autodiff(monkeypatch)
    yield


def test_patches_really_forbid_jax_autodiff(no_jax_autodiff):
    with pytest.raises(JaxAutodiffUsed):
        jax.grad(jnp.sin)(1.0)
    with pytest.raises(JaxAutodiffUsed):
        jax.jvp(jnp.sin, (1.0,), (1.0,))
    # JAX's real grad, reached by its internal path, must hit the patched machinery too.
    from jax._src import api as jax_api
    with pytest.raises(JaxAutodiffUsed):
        jax_api.grad(lambda x: jnp.sin(x) * 2.0)(1.5)
    with pytest.raises(JaxAutodiffUsed):
        jax_api.vjp(lambda x: jnp.cos(x) * 3.0, 1.5)
    with pytest.raises(JaxAutodiffUsed):
        ad.primitive_transposes[lax.add_p]


@pytest.mark.parametrize("name", list(PROGRAMS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bpkit_runs_without_jax_autodiff(no_jax_autodiff, name, jit):
    f, args, argnums, needs = PROGRAMS[name]
    if needs and not all(registry.has_rule(p) for p in needs):
        pytest.skip(f"rules for {[p.name for p in needs]} are not written yet")
    g = bpkit.grad(f, argnums)
    if jit:
        g = jax.jit(g)
    got = g(*args)
    want = REFERENCE[name]
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_shard_map_needs_jax_autodiff_for_jax_but_not_for_bpkit(no_jax_autodiff):
    from jax._src import api as jax_api
    w, x = PROGRAMS["shard_map_collectives"][1]
    with pytest.raises(JaxAutodiffUsed):
        jax_api.grad(spmd)(w, x)
    np.testing.assert_allclose(bpkit.grad(spmd)(w, x), REFERENCE["shard_map_collectives"][0],
                               rtol=1e-9, atol=1e-12)


def test_second_order_without_jax_autodiff(no_jax_autodiff):
    f = lambda x: jnp.sum(jnp.tanh(x) ** 2)  # noqa: E731
    x = jnp.linspace(-1.0, 1.0, 4)
    h = bpkit.grad(lambda x: jnp.sum(bpkit.grad(f)(x)))(x)
    t = jnp.tanh(x)
    np.testing.assert_allclose(h, 2 * (1 - t ** 2) ** 2 - 4 * t ** 2 * (1 - t ** 2), rtol=1e-10)


def test_while_loop_without_jax_autodiff(monkeypatch):
    """A while loop (trip count known only at run time): jax.grad refuses the while itself, so
    the reference is jax.grad of the same loop as a 6-step scan."""
    def step(w, x):
        return jnp.tanh(x * w) + 0.5 * x

    def loss(w, x):
        return jnp.sum(lax.while_loop(lambda c: c[0] < 6, lambda c: (c[0] + 1, step(w, c[1])),
                                      (0, x))[1] ** 2)

    def twin(w, x):
        return jnp.sum(lax.scan(lambda x, _: (step(w, x), None), x, None, length=6)[0] ** 2)

    w, x = jnp.float64(0.8), jnp.linspace(-1.0, 1.0, 3)
    want = jax.grad(twin, (0, 1))(w, x)
    forbid_jax_autodiff(monkeypatch)
    got = jax.jit(bpkit.grad(loss, (0, 1), while_checkpoints=3))(w, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def _with_statics(x, n, train, mode):
    y = lax.fori_loop(0, n, lambda i, c: jnp.sin(c) * 1.5, x)  # concrete n: a scan
    y = y * 0.5 if train else y
    return {"sum": jnp.sum, "mean": jnp.mean}[mode](y ** 2)


STATIC_ARGS = (_normal(0, (3,)), jnp.int32(3), True, "mean")
STATIC_REFERENCE = jax.grad(_with_statics)(*STATIC_ARGS)


def test_calling_convention_without_jax_autodiff(no_jax_autodiff):
    eager = bpkit.grad(_with_statics)(*STATIC_ARGS)
    jitted = jax.jit(bpkit.grad(_with_statics), static_argnums=(1, 2, 3))(
        STATIC_ARGS[0], 3, *STATIC_ARGS[2:])
    for got in (eager, jitted):
        np.testing.assert_allclose(got, STATIC_REFERENCE, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("factory, lib", [("linen_mlp", "flax"), ("nnx_mlp", "flax"),
                                          ("equinox_mlp", "equinox"), ("haiku_mlp", "haiku")])
def test_library_models_without_jax_autodiff(factory, lib, monkeypatch):
    """A Flax, Equinox or Haiku model trained from a config (bpkit.models.adapters) is
    differentiated by bpkit's rules alone, with jax.grad's gradient."""
    pytest.importorskip(lib, reason=f"{lib} is not installed")
    from bpkit.models.adapters import as_model
    from tests.models import user_models
    kwargs = {"num_classes": 3, "hidden": 5}
    if factory in ("nnx_mlp", "equinox_mlp"):
        kwargs["in_features"] = 4
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        x = jnp.asarray(np.linspace(-1, 1, 8 * 4).reshape(8, 4), jnp.float32)
        model = as_model(getattr(user_models, factory)(**kwargs), x)
        params = model.init(jax.random.PRNGKey(0))
        state = model.init_state() if model.stateful else None

        def loss(p):
            out = model.apply(p, x, state=state)[0] if model.stateful else model.apply(p, x)
            return jnp.sum(jnp.tanh(out) ** 2)

        want = jax.grad(loss)(params)
        forbid_jax_autodiff(monkeypatch)
        got = bpkit.grad(loss)(params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_debug_and_per_example_without_jax_autodiff(no_jax_autodiff):
    """nonfinite_origin (forward, backward, the scan observer) and per-example gradient
    norms and DP clipping (ghost plans, the second seeded backward pass) use bpkit only."""
    from bpkit.debug import nonfinite_origin
    from bpkit.per_example import clipped_value_and_grad, per_example_grad_norms

    def scan_sqrt(w, xs):
        c, _ = lax.scan(lambda c, x: (c + jnp.sqrt(x * w), None), jnp.zeros(()), xs)
        return c
    _, _, report = nonfinite_origin(scan_sqrt)(jnp.ones(()), jnp.array([1.0, 0.0, 2.0]))
    assert report.backward.entry.primitive == "sqrt" and report.backward.steps == (1,)
    batch = (MLP_ARGS[1], MLP_ARGS[2])
    norms = per_example_grad_norms(lambda p, b: mlp(p, *b))(MLP_ARGS[0], batch).norms
    assert norms.shape == (6,) and bool(jnp.all(norms > 0))
    _, g, _ = clipped_value_and_grad(lambda p, b: mlp(p, *b), 0.1)(MLP_ARGS[0], batch)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(MLP_ARGS[0])


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_remat_auto_runs_without_jax_autodiff(no_jax_autodiff, name):
    """The automatic save-vs-recompute plan traces the joint program with bpkit's engine only."""
    f, args, argnums, needs = PROGRAMS[name]
    if needs and not all(registry.has_rule(p) for p in needs):
        pytest.skip(f"rules for {[p.name for p in needs]} are not written yet")
    got = jax.jit(bpkit.grad(f, argnums, remat="auto"))(*args)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(REFERENCE[name])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)

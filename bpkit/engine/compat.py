"""Every difference between the JAX releases bpkit supports (0.10.2 through 0.12.x) lives here.

The rest of bpkit reads jaxprs only through these helpers:

* ``open_jaxpr``: a closed jaxpr is ``ClosedJaxpr(jaxpr, consts)`` up to 0.10 and a ``Jaxpr`` that
  carries its own ``consts`` from 0.11 on; both expose ``.jaxpr`` and ``.consts``.
* ``scan_counts``: scan's parameters are ``num_consts/num_carry`` up to 0.10 and the flat-tree
  pair ``ft_in/ft_out`` from 0.11 on.
* ``eval_eqn``: binding an equation's primitive again (subfunctions, name stack, context), the
  way ``jax.core.eval_jaxpr`` does it.
* ``custom_vjp_parts`` / ``custom_jvp_jaxpr``: reading the user's rules out of the
  ``custom_vjp_call`` / ``custom_jvp_call`` equations (their shapes changed between releases).
* ``CHOLESKY_TANGENT_FROM_LOWER``: which part of its input JAX's Cholesky derivative reads.
* ``shard_map_params`` / ``shard_map`` / ``parallel_primitive`` / ``varying_axes``: explicit SPMD
  (``check_rep`` became ``check_vma``; the collectives are not exported by ``jax.extend``; the
  replication types of values inside a ``shard_map`` body), see the section at the end.
* ``backends_are_initialized``: whether JAX has started its backends (``jax._src.xla_bridge``;
  not public on any supported release).
* ``COMPLEX_SIGN_IS_DIFFERENTIABLE``: JAX 0.12 differentiates ``sign`` of a complex number (its
  angle), JAX 0.10 takes it to be constant.

The complex, FFT and special-function primitives (``real imag complex conj fft igamma
igammac polygamma zeta bessel_i0e bessel_i1e regularized_incomplete_beta random_gamma``) and
their parameters are the same on both ends; ``random_gamma_grad`` is no primitive on either.

None of these touch JAX's differentiation machinery: they read jaxprs and call the user's own
custom rules.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax._src import core as _core
from jax._src import source_info_util as _source_info

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

Var = _core.Var
Literal = _core.Literal
DropVar = _core.DropVar
Primitive = _core.Primitive


def open_jaxpr(closed) -> tuple[Any, list]:
    """Return ``(jaxpr, consts)`` for a closed jaxpr of any supported release."""
    return closed.jaxpr, list(closed.consts)


def make_jaxpr(fun, *args):
    """Trace ``fun(*args)`` to ``(jaxpr, consts, out_shape)`` with JAX's public tracer."""
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    jaxpr, consts = open_jaxpr(closed)
    return jaxpr, consts, out_shape


def typeof(x):
    """The abstract value (shape, dtype, weak type) of an array, tracer or Python scalar."""
    return _core.typeof(x)


def scan_counts(params: dict) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    num_in = len(params["jaxpr"].in_avals)
    consts, carry, _ = params["ft_in"].update(list(range(num_in))).unpack()
    return len(list(consts)), len(list(carry))


def is_inexact(aval) -> bool:
    """True for float and complex arrays: the values that can carry a cotangent."""
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, np.inexact)


def eval_eqn(eqn, invals: Sequence[Any]) -> list:
    """Evaluate one equation on concrete or traced values; always returns a list of outputs.

    Keeps the equation's source line and ``jax.named_scope`` name stack on the values it
    creates, so that errors, profiles and diagnostics still point at the user's code.
    """
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with source_context(eqn), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def eval_jaxpr(jaxpr, consts: Sequence[Any], *args) -> list:
    """Evaluate an open jaxpr (as ``jax.core.eval_jaxpr``), e.g. a reduction's computation."""
    return _core.eval_jaxpr(jaxpr, list(consts), *args)


def source_context(eqn):
    """A context that tags new operations with ``eqn``'s traceback and name stack."""
    name_stack = _source_info.current_name_stack() + eqn.source_info.name_stack
    return _source_info.user_context(eqn.source_info.traceback, name_stack=name_stack)


_BPKIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def user_frame(eqn, default: str | None = "unknown location", *,
               allow_bpkit: bool = True) -> str | None:
    """``file:line (function)`` of the user's code that produced ``eqn``, or ``default``.

    The user's frame is the innermost one outside JAX (and the standard library) and outside
    bpkit; a bpkit frame (a layer of ``bpkit.nn``) only when there is no other and
    ``allow_bpkit``. Equations inside a ``jit`` (most of ``jnp.linalg``, ``jax.random``,
    ``jax.scipy``) carry only JAX's frames: the equations that call them name the user's line
    (see ``context_user_frame``).
    """
    return _frame_outside_jax(eqn.source_info.traceback, allow_bpkit) or default


def context_user_frame(*, allow_bpkit: bool = True) -> str | None:
    """The user's frame of the enclosing equation while bpkit evaluates the jaxpr inside it (a
    ``jit``, ``checkpoint``, ``scan``: see ``source_context``); ``None`` at top level."""
    return _frame_outside_jax(_source_info._source_info_context.context.traceback, allow_bpkit)


def _frame_outside_jax(traceback, allow_bpkit: bool) -> str | None:
    if traceback is None:
        return None
    frames = list(_source_info.user_frames(traceback))
    outside = [f for f in frames if not f.file_name.startswith(_BPKIT_DIR)]
    if not outside and allow_bpkit:
        outside = frames
    if not outside:
        return None
    f = outside[0]
    return f"{f.file_name}:{f.start_line} ({f.function_name})"


def name_stack(eqn) -> str:
    """The ``jax.named_scope`` path of the equation, e.g. ``"block_0/attn"``."""
    return str(eqn.source_info.name_stack)


def with_outvars(jaxpr, outvars):
    """``jaxpr`` returning ``outvars`` (e.g. an intermediate value as an extra output)."""
    return jaxpr.replace(outvars=list(outvars))


def custom_jvp_jaxpr(params: dict, tangent_is_zero: Sequence[bool]):
    """The user's custom JVP rule of a ``custom_jvp_call`` as ``(jaxpr, consts, out_zeros)``.

    The returned jaxpr maps ``(*primals, *nonzero_tangents) -> (*primal_outs, *nonzero_tangent_outs)``.
    Tracing it only runs the user's own rule function; no JAX differentiation is involved.
    """
    fun = params.get("jvp_jaxpr_fun", params.get("jvp_jaxpr_thunk"))
    jvp_jaxpr, consts, out_zeros = fun.call_wrapped(*tangent_is_zero)
    if hasattr(jvp_jaxpr, "eqns") and not hasattr(jvp_jaxpr, "consts"):
        inner, consts = jvp_jaxpr, list(consts)
    else:
        inner, inner_consts = open_jaxpr(jvp_jaxpr)
        consts = list(inner_consts) + list(consts)
    return _consts_as_constvars(inner, consts), consts, list(out_zeros)


def _consts_as_constvars(jaxpr, consts: list):
    """On JAX 0.12 a custom JVP rule's jaxpr takes the constants it closes over (e.g. the NumPy
    tables of ``jax.scipy.special.zeta``'s rule) as its leading *inputs*, which JAX binds with
    ``eval_jaxpr(jaxpr, consts, *args)`` to ``constvars + invars`` in order. Make those inputs
    constvars, so that the jaxpr's inputs are exactly ``(*primals, *nonzero_tangents)``."""
    extra = len(consts) - len(jaxpr.constvars)
    if extra <= 0:
        return jaxpr
    if isinstance(jaxpr, _core.Jaxpr) and hasattr(jaxpr, "consts"):
        # 0.11+: a Jaxpr's constvars are its first inputs that carry values (ClosedJaxpr style)
        return _core.Jaxpr(jaxpr, consts)
    return jaxpr.replace(constvars=list(jaxpr.constvars) + list(jaxpr.invars[:extra]),
                         invars=list(jaxpr.invars[extra:]))


def custom_vjp_parts(params: dict):
    """Split a ``custom_vjp_call`` equation into ``(num_consts, fwd, bwd, out_trees)``.

    ``fwd(*args, nonzero_mask)`` runs the user's forward rule and returns
    ``(residuals, primal_outs)``; ``bwd(residuals, cts_out)`` runs the user's backward rule and
    returns one cotangent per argument, ``None`` where the rule gave a symbolic zero.
    """
    num_consts = params["num_consts"]
    fwd_jaxpr_thunk = params["fwd_jaxpr_thunk"]
    bwd_fun = params["bwd"]
    out_trees = params["out_trees"]

    def fwd(args, nonzero):
        primals = args[num_consts:]
        fwd_jaxpr, fwd_consts = fwd_jaxpr_thunk.call_wrapped(*nonzero[num_consts:])
        if hasattr(fwd_jaxpr, "consts") and not isinstance(fwd_jaxpr, _core.Jaxpr):
            fwd_jaxpr, more = open_jaxpr(fwd_jaxpr)
            fwd_consts = list(more) + list(fwd_consts)
        res_and_outs = _core.eval_jaxpr(fwd_jaxpr, fwd_consts, *primals)
        _, res_tree, input_fwds = out_trees()
        num_res_out = res_tree.num_leaves - sum(f is not None for f in input_fwds)
        res_out, outs = res_and_outs[:num_res_out], res_and_outs[num_res_out:]
        res_iter = iter(res_out)
        res = [next(res_iter) if f is None else primals[f] for f in input_fwds]
        return res, outs

    def bwd(res, cts_out):
        result = bwd_fun.call_wrapped(*res, *cts_out)
        if _BWD_RETURNS_LOGS:
            result = result[0]
        return [None if _is_symbolic_zero(ct) else ct for ct in result[num_consts:]]

    return num_consts, fwd, bwd


def _is_symbolic_zero(x) -> bool:
    return type(x).__name__ in ("Zero", "SymbolicZero")


# From JAX 0.11 the user's bwd is wrapped to return ``(cotangents, logs)``.
_BWD_RETURNS_LOGS = JAX_VERSION >= (0, 11, 0)


def custom_vjp_call_jaxpr(params: dict):
    """The primal function of a ``custom_vjp_call``/``custom_jvp_call`` equation as a closed jaxpr."""
    return params.get("call_jaxpr", params.get("fun_jaxpr"))


def jit_jaxpr(params: dict):
    """The body of a ``jit``/``pjit``/``closed_call``/``remat`` equation."""
    return params.get("jaxpr", params.get("call_jaxpr"))


def float0_zeros(aval):
    """JAX's cotangent for an integer, boolean or key input: an array of dtype float0."""
    return np.zeros(aval.shape, dtype=jax.dtypes.float0)


def current_trace():
    """The trace JAX is recording into now (``EvalTrace`` when eager); compared by identity to
    tell a nested trace (a loop body being traced) from the one an observer watches."""
    return _core.trace_ctx.trace


def is_tracer(x) -> bool:
    return isinstance(x, _core.Tracer)


def _complex_sign_is_differentiable() -> bool:
    """JAX 0.10 takes the derivative of ``sign`` to be zero everywhere; JAX 0.12 differentiates
    ``sign`` of a complex number (its angle moves). Detected by the presence of JAX's own
    complex-aware JVP function (only its presence is read; bpkit never calls it)."""
    from jax._src.lax import lax as _lax_internal
    return hasattr(_lax_internal, "_sign_jvp_rule")


COMPLEX_SIGN_IS_DIFFERENTIABLE = _complex_sign_is_differentiable()
# Where JAX keeps the primitives that neither jax.lax nor jax.extend exports on every release.
_INTERNAL_MODULES = ("jax._src.lax.lax", "jax._src.lax.control_flow", "jax._src.lax.ann",
                     "jax._src.lax.windowed_reductions", "jax._src.ad_util",
                     "jax._src.ad_checkpoint", "jax._src.custom_derivatives", "jax._src.pjit",
                     "jax._src.lax.scaled_dot", "jax._src.lax.control_flow.loops",
                     "jax._src.lax.eval_jaxpr", "jax._src.debugging", "jax._src.callback",
                     "jax._src.hijax", "jax._src.interpreters.ad", "jax._src.core",
                     "jax._src.program_order",
                     "jax._src.state.primitives",
                     "jax._src.random.prng", "jax._src.random.core",
                     "jax._src.random.threefry4x32", "jax._src.random.philox2x32",
                     "jax._src.random.philox4x32")


def internal_primitive(name: str):
    """A primitive that ``jax.extend`` does not export on every release (e.g. ``unstack_p``,
    new in 0.11, or ``name_p`` of ``checkpoint_name``), looked up by its attribute name in
    JAX's internal modules; ``None`` on releases that do not have it."""
    import importlib
    import jax.extend.core.primitives as prims
    for module in (prims, jax.lax, *_INTERNAL_MODULES):
        try:
            mod = importlib.import_module(module) if isinstance(module, str) else module
        except ImportError:
            continue
        p = getattr(mod, name, None)
        if isinstance(p, Primitive):
            return p
    return None


# The Cholesky derivative of JAX 0.10.2 uses the whole tangent dΣ; JAX 0.12 first builds the
# Hermitian tangent from dΣ's lower triangle (the only part the primitive reads). 0.11 behaves
# like 0.12 (0.11.2: the cholesky rows of tests/rules/test_linalg_decomp.py, slow ones included).
CHOLESKY_TANGENT_FROM_LOWER = JAX_VERSION >= (0, 11, 0)


# XLA compiler options for bpkit's jitted train and eval steps, measured on the benchmark's
# reference models (docs/benchmarks.md, "XLA options"), each compiled both ways in one process:
# * ``xla_cpu_copy_insertion_use_region_analysis``: XLA's liveness analysis by regions drops
#   the copies of a while loop's carries that the default inserts on every iteration (the LSTM
#   step's two loops: 3 copies each -> 0): LSTM step 0.93x on JAX 0.10.2 and 0.12.0.1, the
#   other models unchanged; results bitwise equal. XLA's CPU default is off.
# * ``xla_cpu_experimental_ynn_fusion_type``: XLA's CPU backend hands dot products, reductions
#   and convolutions to YNNPACK by default (INDIVIDUAL_DOT, REDUCE, INDIVIDUAL_CONVOLUTION in
#   jaxlib 0.10.2, 0.11.2 and 0.12.0.1). In 0.10.x YNNPACK's convolutions are slower than
#   XLA's own (Eigen's): the 2-D CNN step 14.6-14.9 ms with them, 11.9-12.2 ms without. In
#   0.12.0.1 they are as fast or slower, per-round medians of YNNPACK / Eigen over 40-100 rounds:
#   2-D CNN 1.006-1.061, 1-D CNN 0.998, RGB 32x32 CNN 1.010-1.076, 32/64-channel CNN
#   1.079-1.082, four-stage CNN 1.005. In 0.11.2 it depends on the model (2-D CNN 0.96, RGB
#   1.01, 32/64-channel 1.04), so 0.11 keeps XLA's default.
# Both are CPU options: other platforms compile with XLA's defaults (not measured here).
_CPU_LIBRARY_FUSIONS_WITHOUT_CONVOLUTION = (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")
YNNPACK_CONVOLUTIONS_ON_CPU = (0, 11, 0) <= JAX_VERSION < (0, 12, 0)


def step_compiler_options(platform: str) -> dict[str, str]:
    """XLA compiler options for bpkit's jitted train and eval steps on this JAX release and
    ``platform`` (``jax.default_backend()``), those measured faster than XLA's defaults."""
    if platform != "cpu":
        return {}
    options = {"xla_cpu_copy_insertion_use_region_analysis": "True"}
    if not YNNPACK_CONVOLUTIONS_ON_CPU:
        options["xla_cpu_experimental_ynn_fusion_type"] = _CPU_LIBRARY_FUSIONS_WITHOUT_CONVOLUTION
    return options


def backends_are_initialized() -> bool:
    """Whether JAX has started its backends (its first computation or ``jax.devices()``)."""
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def started_platform() -> str | None:
    """The default backend's platform (``"cpu"``, ``"gpu"``, ``"tpu"``) if JAX has started its
    backends, else ``None``: rules may tune their output to it without starting a backend
    (``jax.distributed.initialize`` and ``bpkit.reuse_host_memory`` must come before that)."""
    return jax.default_backend() if backends_are_initialized() else None


def as_array(x):
    """Python scalars become (weakly typed) JAX arrays so rules can rely on ``.dtype``."""
    return jax.numpy.asarray(x) if isinstance(x, (bool, int, float, complex)) else x


# --- explicit SPMD: shard_map and the collectives ------------------------------------------------
# ``jax.shard_map`` (public from 0.10) stages the primitive ``shard_map`` with parameters ``mesh,
# in_specs, out_specs, check_vma, newly_manual_axes, jaxpr``; older releases (the
# ``jax.experimental.shard_map`` module) called ``check_vma`` ``check_rep`` and named the axes
# left automatic (``auto``) instead of the manual ones. ``jax.pmap`` lowers to ``jit`` of a
# ``shard_map`` on every supported release (there is no ``xla_pmap`` primitive any more), so the
# shard_map rule differentiates pmap too. The collectives live in ``jax._src.lax.parallel``
# (``jax.extend`` does not export them); ``pvary`` (invariant -> varying over mesh axes, the
# type cast that ``check_vma`` inserts) lives in ``jax._src.core``.
from jax._src import config as _config  # noqa: E402
from jax._src import shard_map as _shard_map_module  # noqa: E402
from jax._src.lax import parallel as _parallel  # noqa: E402

shard_map_p = _shard_map_module.shard_map_p
pvary_p = getattr(_core, "pvary_p", None)


def parallel_primitive(name: str):
    """A collective's primitive object (``psum_p``, ``all_gather_p``...), ``None`` if absent."""
    return getattr(_parallel, name, None)


def shard_map_params(params: dict):
    """``(body, consts, check_vma, manual_axes)`` of a ``shard_map`` equation: the per-shard
    body as an open jaxpr with its constants, whether replication is type-checked, and the mesh
    axes the body is manual over (the axes its collectives may name)."""
    body = params["jaxpr"]
    body, consts = open_jaxpr(body) if hasattr(body, "jaxpr") else (body, [])
    check_vma = params["check_vma"] if "check_vma" in params else params["check_rep"]
    if "newly_manual_axes" in params:
        manual = frozenset(params["newly_manual_axes"])
    else:
        manual = frozenset(params["mesh"].axis_names) - frozenset(params.get("auto", ()))
    return body, list(consts), bool(check_vma), manual


def shard_map(fun, *, mesh, in_specs, out_specs, check_vma: bool, manual_axes):
    """``jax.shard_map`` over ``manual_axes`` of ``mesh`` (with the older spelling on releases
    that predate it)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fun, mesh=mesh, in_specs=tuple(in_specs),
                             out_specs=tuple(out_specs), check_vma=check_vma,
                             axis_names=set(manual_axes))
    from jax.experimental.shard_map import shard_map as _legacy  # pragma: no cover
    return _legacy(fun, mesh=mesh, in_specs=tuple(in_specs), out_specs=tuple(out_specs),
                   check_rep=check_vma,
                   auto=frozenset(mesh.axis_names) - frozenset(manual_axes))


def varying_axes(aval) -> frozenset:
    """The mesh axes over which a value inside a ``check_vma`` shard_map may differ per shard."""
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def cotangent_spec(spec):
    """The partition spec of a cotangent of a value laid out by ``spec`` (reduced and unreduced
    axes swap roles; a plain spec is its own cotangent spec)."""
    return spec.to_ct_spec() if hasattr(spec, "to_ct_spec") else spec


def shape_struct(aval) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` for tracing a function on values of type ``aval``, keeping the
    mesh axes it varies over (inside a ``check_vma`` shard_map the type includes them)."""
    mat = getattr(aval, "mat", None)
    if mat is not None and mat.varying:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=aval.sharding,
                                    manual_axis_type=mat)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


def match_varying(x, like):
    """``x`` cast to vary over the mesh axes ``like`` varies over (zeros and constants built
    inside a ``check_vma`` shard_map are invariant until cast; outside one this is ``x``)."""
    missing = varying_axes(typeof(like)) - varying_axes(typeof(x))
    return jax.lax.pcast(x, tuple(sorted(missing, key=str)), to="varying") if missing else x


def trace_context() -> tuple:
    """What a trace depends on besides its input types: the named axes in scope (inside a
    shard_map body, with their sizes) and whether replication is type-checked there."""
    sizes = getattr(_core.get_axis_env(), "axis_sizes", {})
    check = getattr(getattr(_config, "_check_vma", None), "value", None)
    return tuple(sorted(sizes.items(), key=lambda kv: str(kv[0]))), check

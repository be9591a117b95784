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

None of these touch JAX's differentiation machinery: they read jaxprs and call the user's own
custom rules.
"""
from __future__ import annotations

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


def source_context(eqn):
    """A context that tags new operations with ``eqn``'s traceback and name stack."""
    name_stack = _source_info.current_name_stack() + eqn.source_info.name_stack
    return _source_info.user_context(eqn.source_info.traceback, name_stack=name_stack)


def user_frame(eqn) -> str:
    """``file:line (function)`` of the user's code that produced ``eqn``, or ``"unknown"``."""
    frame = _source_info.user_frame(eqn.source_info.traceback)
    if frame is None:
        return "unknown location"
    return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"


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
        return jvp_jaxpr, list(consts), list(out_zeros)
    inner, inner_consts = open_jaxpr(jvp_jaxpr)
    return inner, list(inner_consts) + list(consts), list(out_zeros)


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


def is_tracer(x) -> bool:
    return isinstance(x, _core.Tracer)


def internal_primitive(name: str):
    """A lax primitive that ``jax.extend`` does not export (e.g. ``unstack_p``, new in 0.11),
    or ``None`` on releases that do not have it."""
    from jax._src.lax import lax as _lax_internal
    return getattr(_lax_internal, name, None)


# The Cholesky derivative of JAX 0.10.2 uses the whole tangent dΣ; JAX 0.12 first builds the
# Hermitian tangent from dΣ's lower triangle (the only part the primitive reads). 0.11 is assumed
# to behave like 0.12 (not installed here to check).
CHOLESKY_TANGENT_FROM_LOWER = JAX_VERSION >= (0, 11, 0)


def as_array(x):
    """Python scalars become (weakly typed) JAX arrays so rules can rely on ``.dtype``."""
    return jax.numpy.asarray(x) if isinstance(x, (bool, int, float, complex)) else x

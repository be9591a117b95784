"""Deliberate refusals: primitives bpkit will not differentiate, each with the reason and what
JAX itself does. ``bpkit.grad`` stops at them with this text (``UnsupportedPrimitiveError``);
``bpkit rules`` lists them. Everything else JAX binds has a rule (or is non-differentiable, see
``nondiff.py``); ``tests/rules/test_every_primitive.py`` keeps it that way.

The list has three kinds of entries:

* **JAX refuses too** (no reverse-mode derivative exists): ``reduce_window`` and ``select_and_scatter`` with custom computations, callbacks,
  ``composite``, ``remat_opt`` (second order through ``optimize_remat``), ``scaled_dot``.
* **JAX differentiates it, bpkit does not (yet)**: mutable references (``jax.new_ref``) and
  JAX's high-level primitives (``jax._src.hijax``) with floating-point outputs.
* **Never in a program bpkit sees**: primitives JAX resolves while tracing, keeps as stubs, or
  creates only inside its own differentiation.
"""
from __future__ import annotations

from bpkit.engine import compat
from bpkit.engine.registry import has_rule, register_refused

_CALLBACK_ADVICE = (
    "Give the function a derivative with jax.custom_jvp or jax.custom_vjp (bpkit runs the "
    "user's rule), or wrap the call in jax.lax.stop_gradient if it needs none.")

_REFUSALS = {
    # --- JAX refuses too --------------------------------------------------------------------
    "reduce_window_p":
        "a reduce_window with a custom reduction has no reverse-mode derivative (jax.grad "
        "refuses it too). Write the pooling with jax.lax.reduce_window and lax.add, lax.max or "
        "lax.min (initial value 0, -inf or +inf), which become reduce_window_sum/max/min, or "
        "express the reduction with those (a product pool is exp of a sum pool of logs, for "
        "positive inputs).",
    "select_and_scatter_p":
        "a select_and_scatter with custom select/scatter computations has no derivative (JAX "
        "has none either); only its select_and_scatter_add form (max/min pooling gradients) "
        "is differentiable.",
    "pure_callback_p":
        "jax.pure_callback runs Python code JAX cannot look into, so it has no derivative "
        "(jax.grad refuses it too). " + _CALLBACK_ADVICE,
    "io_callback_p":
        "jax.experimental.io_callback runs Python code with side effects and has no "
        "derivative (jax.grad refuses it too). " + _CALLBACK_ADVICE,
    "composite_p":
        "lax.composite has no derivative in JAX (jax.grad refuses it: the decomposition is a "
        "reference implementation for backends, not a differentiation rule). Wrap the "
        "composite in jax.custom_jvp or jax.custom_vjp; bpkit runs that rule.",
    "remat_opt_p":
        "remat_opt (the forward rule of a custom_vjp with optimize_remat=True) appears when a "
        "jax.grad of such a function is differentiated again; JAX's reverse mode cannot do "
        "that either. Use optimize_remat=False for functions differentiated twice.",
    "scaled_dot_p":
        "scaled_dot (block-scaled low-precision matmuls) has no derivative in JAX either. "
        "Differentiate a dot_general of the dequantised operands instead.",
    # --- JAX differentiates it, bpkit does not (yet) ----------------------------------------
    "ref_p":
        "mutable array references (jax.new_ref and reads/writes through them) are not "
        "supported by bpkit's engine, which differentiates pure functions (JAX differentiates "
        "them). Thread the state through the function's arguments and results, or a "
        "jax.lax.scan carry.",
    "get_p": "reads through a mutable array reference (see new_ref) are not supported.",
    "swap_p": "writes through a mutable array reference (see new_ref) are not supported.",
    "addupdate_p": "updates through a mutable array reference (see new_ref) are not supported.",
    "call_hi_primitive_p":
        "JAX's high-level primitives (jax._src.hijax; on JAX >= 0.12 jnp.ldexp and jnp.frexp "
        "are such) carry derivative methods written against JAX's own AD internals, which "
        "bpkit does not call (JAX does). Integer-valued ones (jnp.searchsorted and "
        "jnp.nonzero, used by jnp.interp) need no rule and work. Write ldexp as x * 2.0**n.",
    # --- never in a program bpkit sees ------------------------------------------------------
    "stage_p": "lax.stage is resolved by JAX while tracing and never appears in a jaxpr.",
    "eval_jaxpr_p": "JAX inlines eval_jaxpr while tracing; it never appears in a jaxpr.",
    "custom_jvp_call_jaxpr_p": "a removed primitive JAX keeps as a stub; nothing binds it.",
    "call_p": "a legacy call primitive nothing in JAX binds any more (jit is supported).",
    "relayout_p":
        "relayout belongs to JAX's internal explicit-layout mode (JAX >= 0.12), which no public "
        "API enters; jax.experimental.layout.with_layout_constraint is supported.",
    "zeros_like_p":
        "ad_util.zeros_like has no abstract evaluation, so it cannot appear in a jaxpr.",
    "to_edtype_p":
        "conversions to JAX-internal extended dtypes (jax._src.dtypes.primal_tangent_dtype) "
        "are not public; PRNG keys, the public extended dtype, cannot be converted.",
    "from_edtype_p":
        "conversions from JAX-internal extended dtypes (see to_edtype) are not public.",
    "custom_lin_p":
        "custom_lin exists only inside JAX's own linearization of a custom_vjp function and "
        "never appears in a traced user program.",
    "unreachable_p":
        "unreachable marks code JAX must never run (forward-mode differentiation of a "
        "custom_vjp function); evaluating it raises.",
}

for _name, _why in _REFUSALS.items():
    _p = compat.internal_primitive(_name)
    if _p is not None and not has_rule(_p):  # eval_jaxpr is closed_call on JAX >= 0.12
        register_refused(_p, _why)

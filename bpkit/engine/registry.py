"""The rule registry: one hand-written VJP rule per JAX primitive, keyed by the primitive object.

There are three kinds of entry:

* **VJP rules** ``rule(ct, *primals, out, **params) -> cotangents``: the engine evaluates the
  primitive itself, then (in the backward sweep) calls the rule with the output cotangent ``ct``
  (a list for multi-output primitives, with ``None`` for a zero), the primal inputs, the primal
  output ``out`` and the equation's parameters. The rule returns one cotangent per primal
  input, ``None`` meaning zero. Almost every primitive is of this kind; see ``bpkit/rules/``.
* **forward-backward rules** ``rule(primals, active, **params) -> (outs, pullback)``: for
  primitives whose backward pass needs residuals that their forward pass must produce in a
  different way (scan saves per-step values, remat saves nothing, ``custom_vjp`` runs the
  user's forward rule). ``active[i]`` says whether input ``i`` needs a cotangent.
* **non-differentiable primitives**: their outputs never carry a cotangent (comparisons,
  ``floor``, random bits, ``stop_gradient``...), exactly as their JAX derivatives are zero.
"""
from __future__ import annotations

from typing import Callable

from bpkit.engine import compat

VJPRule = Callable[..., "list | tuple"]
FwdBwdRule = Callable[..., tuple]

vjp_rules: dict[compat.Primitive, VJPRule] = {}
fwd_bwd_rules: dict[compat.Primitive, FwdBwdRule] = {}
nondiff_primitives: set[compat.Primitive] = set()
# Primitives that are supported elsewhere but can never be reverse-differentiated, with why.
refused_primitives: dict[compat.Primitive, str] = {}


class UnsupportedPrimitiveError(NotImplementedError):
    """A primitive on the differentiated path has no bpkit rule."""


def register_vjp(primitive, rule: VJPRule | None = None):
    """Register ``rule`` as the VJP rule of ``primitive``; usable as a decorator.

    ``rule(ct, *primals, out, **params)`` returns one cotangent per primal input (``None`` for
    zero). Example, for a user-defined primitive ``my_sin_p``::

        @bpkit.register_vjp(my_sin_p)
        def _my_sin_vjp(ct, x, *, out):
            return [ct * jnp.cos(x)]
    """
    if rule is None:
        return lambda r: register_vjp(primitive, r)
    _check_primitive(primitive)
    vjp_rules[primitive] = rule
    return rule


def register_fwd_bwd(primitive, rule: FwdBwdRule | None = None):
    """Register a forward-backward rule ``rule(primals, active, **params) -> (outs, pullback)``."""
    if rule is None:
        return lambda r: register_fwd_bwd(primitive, r)
    _check_primitive(primitive)
    fwd_bwd_rules[primitive] = rule
    return rule


def register_nondiff(*primitives) -> None:
    """Declare primitives whose outputs have zero derivative everywhere JAX defines one."""
    for p in primitives:
        _check_primitive(p)
        nondiff_primitives.add(p)


def register_refused(primitive, why: str) -> None:
    """Declare a primitive that cannot be reverse-differentiated; ``why`` is shown to the user."""
    _check_primitive(primitive)
    refused_primitives[primitive] = why


def has_rule(primitive) -> bool:
    return primitive in vjp_rules or primitive in fwd_bwd_rules or primitive in nondiff_primitives


def registered_primitives() -> dict[str, str]:
    """Every primitive bpkit knows, by name, with its kind: ``vjp``, ``fwd_bwd``, ``nondiff``, ``refused``."""
    kinds = {}
    for table, kind in ((vjp_rules, "vjp"), (fwd_bwd_rules, "fwd_bwd"),
                        (nondiff_primitives, "nondiff"), (refused_primitives, "refused")):
        for p in table:
            kinds[p.name] = kind
    return dict(sorted(kinds.items()))


def _check_primitive(p) -> None:
    if not isinstance(p, compat.Primitive):
        raise TypeError(
            f"Rules are registered on primitive objects (such as jax.lax.sin_p), but got {p!r}. "
            "Pass the primitive itself, not its name.")


def unsupported(eqn) -> UnsupportedPrimitiveError:
    """The error for an equation whose primitive has no rule, naming the user's line and the fix."""
    prim = eqn.primitive
    where = compat.user_frame(eqn)
    if prim in refused_primitives:
        return UnsupportedPrimitiveError(
            f"bpkit cannot differentiate '{prim.name}' (produced at {where}): "
            f"{refused_primitives[prim]}")
    return UnsupportedPrimitiveError(
        f"bpkit has no VJP rule for the primitive '{prim.name}', produced at {where}, and the "
        "value it computes depends on the inputs being differentiated. Add a rule with "
        "bpkit.register_vjp, for example:\n\n"
        f"    @bpkit.register_vjp({_primitive_expr(prim)})\n"
        f"    def _{prim.name}_vjp(ct, *primals, out, **params):\n"
        "        return [...]  # one cotangent per primal input, None for zero\n\n"
        "or wrap the computation in jax.lax.stop_gradient if it needs no gradient. "
        "`bpkit rules` lists the primitives that have rules.")


def _primitive_expr(prim) -> str:
    import jax.extend.core.primitives as prims
    for name in dir(prims):
        if getattr(prims, name, None) is prim:
            return f"jax.extend.core.primitives.{name}"
    return f"<the '{prim.name}' primitive object>"

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
    """A primitive on the differentiated path has no bpkit rule.

    ``primitive`` is the primitive object (what ``register_vjp`` takes, also for primitives that
    no module exports) and ``location`` the user's line that produced it (``None`` if unknown).
    """

    def __init__(self, message: str, *, primitive=None, location: str | None = None,
                 render: Callable[[str], str] | None = None):
        super().__init__(message)
        self.primitive, self.location, self._render = primitive, location, render

    def locate(self, eqn) -> None:
        """Name the user's line of ``eqn``, an enclosing call of the equation that failed, if the
        location is still unknown (the equations inside ``jnp``'s jitted functions only carry
        JAX's frames)."""
        if self.location is None and self._render is not None:
            self.location = compat.user_frame(eqn, None, allow_bpkit=False)
            if self.location is not None:
                self.args = (self._render(self.location),)


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
    where = (compat.user_frame(eqn, None, allow_bpkit=False)
             or compat.context_user_frame(allow_bpkit=False))
    if prim in refused_primitives:
        render = lambda at: (f"bpkit cannot differentiate '{prim.name}' (produced at {at}): "  # noqa: E731
                             f"{refused_primitives[prim]}")
    elif not any(compat.is_inexact(v.aval) for v in eqn.outvars):
        render = lambda at: (  # noqa: E731
            f"bpkit has no rule for the primitive '{prim.name}', produced at {at}. Its outputs "
            "are all integer or boolean, so no cotangent flows back through it and it needs "
            "no VJP rule: declare it non-differentiable with\n\n"
            f"{_primitive_snippet(prim, 'bpkit.register_nondiff({})')}")
    else:
        render = lambda at: (  # noqa: E731
            f"bpkit has no VJP rule for the primitive '{prim.name}', produced at {at}, and the "
            "value it computes depends on the inputs being differentiated. Add a rule with "
            "bpkit.register_vjp, for example:\n\n"
            + _primitive_snippet(
                prim, f"@bpkit.register_vjp({{}})\ndef _{prim.name}_vjp(ct, *primals, out, "
                "**params):\n    return [...]  # one cotangent per primal input, None for zero")
            + "\n\nor wrap the computation in jax.lax.stop_gradient if it needs no gradient. "
            "`bpkit rules` lists the primitives that have rules; docs/engine.md has the recipe "
            "for third-party primitives.")
    shown = (where or compat.user_frame(eqn, None) or compat.context_user_frame()
             or "an unknown location")  # a bpkit frame (a layer of bpkit.nn) if nothing else
    return UnsupportedPrimitiveError(render(shown), primitive=prim, location=where,
                                     render=render)


def _primitive_snippet(prim, code: str) -> str:
    """``code`` (with ``{}`` for the primitive), indented, preceded by how to get the object."""
    public = _public_name(prim)
    if public is not None:
        lines = code.format(public)
    else:
        found = _defining_module(prim)
        if found is not None:
            module, attr = found
            lines = (f"from {module} import {attr}  # not exported by jax.extend\n\n"
                     + code.format(attr))
        else:
            lines = (f"# No module exports '{prim.name}': take the object from this error\n"
                     "# (`except bpkit.UnsupportedPrimitiveError as err: prim = err.primitive`)\n"
                     + code.format("prim"))
    return "\n".join("    " + line if line else "" for line in lines.split("\n"))


def _public_name(prim) -> str | None:
    """``jax.extend.core.primitives.X`` or ``jax.lax.X`` when a public module exports ``prim``."""
    import jax.extend.core.primitives as prims
    import jax.lax
    for module, path in ((prims, "jax.extend.core.primitives"), (jax.lax, "jax.lax")):
        for name in dir(module):
            if getattr(module, name, None) is prim:
                return f"{path}.{name}"
    return None


def _defining_module(prim) -> tuple[str, str] | None:
    """``(module, attribute)`` of an imported module holding ``prim`` (JAX internals, or a
    library such as Equinox), preferring the shortest public-looking path."""
    import sys
    found = []
    for mod_name, module in list(sys.modules.items()):
        if module is None:
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if value is prim:
                found.append((mod_name.count("._"), len(mod_name), mod_name, attr))
    return min(found)[2:] if found else None

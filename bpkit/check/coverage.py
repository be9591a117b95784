"""Which primitives bpkit has rules for, and which ones a program needs but lacks (`bpkit rules`).

* ``supported_primitives()``: every primitive bpkit knows, by name, with its kind (``vjp``,
  ``fwd_bwd``, ``nondiff``, ``refused``).
* ``primitives_used(fun, *args)``: the names of all primitives in ``fun``'s jaxpr, sub-jaxprs
  included (jit bodies, scan/cond bodies, remat, custom_jvp/custom_vjp primal functions).
* ``unsupported_in(fun, *args)``: the primitives on the differentiated path (the floating-point
  inputs, followed through every equation and into sub-jaxprs) that have no rule, each with the
  user's source line, i.e. what ``bpkit.grad`` would stop at. Integer and random-bit side
  computations, and equations without a floating-point output, are not on that path and
  need no rule.
* ``rules_command(argv)``: the ``bpkit rules`` command (also ``scripts/rule_coverage.py``).

``args`` may be arrays or ``jax.ShapeDtypeStruct``s: nothing is computed, only traced.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from bpkit.engine import compat, registry

# The rule family modules, in the order ``bpkit rules`` prints them.
FAMILIES = ("elementwise", "structural", "slicing", "reductions", "linalg", "linalg_decomp",
            "conv", "windows", "fft", "special", "collectives", "control", "loops", "nondiff",
            "refusals")


def supported_primitives() -> dict[str, str]:
    """``{primitive name: kind}`` for every primitive bpkit has a rule for (or refuses)."""
    import bpkit.rules  # noqa: F401  (registers every rule)
    return registry.registered_primitives()


def _sub_jaxprs(params: dict):
    """``(key, jaxpr)`` for every jaxpr-valued parameter (a jaxpr, closed jaxpr or a tuple of
    them, such as cond's ``branches``). Callables (custom rules' thunks) are not jaxprs."""
    for key, value in params.items():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if hasattr(item, "eqns"):
                yield key, item
            elif hasattr(item, "jaxpr") and hasattr(getattr(item, "jaxpr"), "eqns"):
                yield key, item.jaxpr


def primitives_in_jaxpr(jaxpr) -> set[str]:
    """Names of all primitives in ``jaxpr`` (open or closed) and its sub-jaxprs."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names: set[str] = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for _, sub in _sub_jaxprs(eqn.params):
            names |= primitives_in_jaxpr(sub)
    return names


def primitives_used(fun: Callable, *args, **kwargs) -> set[str]:
    """Names of all primitives ``fun(*args, **kwargs)`` uses, sub-jaxprs included."""
    return primitives_in_jaxpr(jax.make_jaxpr(lambda *a: fun(*a, **kwargs))(*args))


def unsupported_in(fun: Callable, *args, argnums: int | Sequence[int] | None = None,
                   **kwargs) -> list[tuple[str, str]]:
    """``[(primitive name, user location)]`` for each equation on the differentiated path whose
    primitive has no rule (or is refused, like a custom ``reduce_window``), in program order, without repeats.

    ``argnums`` (default: every argument) are the differentiated arguments; only their
    floating-point leaves start the path.
    """
    import bpkit.rules  # noqa: F401
    closed = jax.make_jaxpr(lambda *a: fun(*a, **kwargs))(*args)
    nums = range(len(args)) if argnums is None else (
        (argnums,) if isinstance(argnums, int) else tuple(argnums))
    active = []
    for i, a in enumerate(args):
        n = len(jax.tree_util.tree_leaves(a))
        active += [i in nums] * n
    found: list[tuple[str, str]] = []
    _walk(closed.jaxpr, active, found)
    seen, unique = set(), []
    for item in found:
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def _walk(jaxpr, active_in: Sequence[bool], found: list) -> list[bool]:
    """Propagate activity through ``jaxpr``; record rule-less active equations; return the
    activity of the outputs."""
    active = {v for v, a in zip(jaxpr.invars, active_in) if a and compat.is_inexact(v.aval)}
    is_active = lambda v: isinstance(v, compat.Var) and v in active  # noqa: E731
    for eqn in jaxpr.eqns:
        mask = [is_active(v) for v in eqn.invars]
        prim = eqn.primitive
        if (not any(mask) or prim in registry.nondiff_primitives
                or not any(compat.is_inexact(v.aval) for v in eqn.outvars)):
            continue  # as in the engine: no floating-point output, no cotangent, no rule
        if prim in registry.refused_primitives or not registry.has_rule(prim):
            found.append((prim.name, compat.user_frame(eqn)))
            out_mask = [True] * len(eqn.outvars)
        else:
            out_mask = _inner_activity(eqn, mask, found)
        active.update(v for v, a in zip(eqn.outvars, out_mask)
                      if a and not isinstance(v, compat.DropVar) and compat.is_inexact(v.aval))
    return [is_active(v) for v in jaxpr.outvars]


def _inner_activity(eqn, mask: list[bool], found: list) -> list[bool]:
    """Walk the sub-jaxprs of a control-flow equation that has a rule; outputs' activity."""
    prim, params = eqn.primitive, eqn.params
    n_out = len(eqn.outvars)
    if prim.name == "scan":
        body = getattr(params["jaxpr"], "jaxpr", params["jaxpr"])
        num_consts, num_carry = compat.scan_counts(params)
        return _walk_loop(body, mask[:num_consts], mask[num_consts:num_consts + num_carry],
                          mask[num_consts + num_carry:], found)
    if prim.name == "while":  # the condition is not differentiated; the body's carry is a fixpoint
        n_cc, n_bc = params["cond_nconsts"], params["body_nconsts"]
        body = getattr(params["body_jaxpr"], "jaxpr", params["body_jaxpr"])
        return _walk_loop(body, mask[n_cc:n_cc + n_bc], mask[n_cc + n_bc:], [], found)
    if prim.name == "cond":
        outs = [False] * n_out
        for _, branch in _sub_jaxprs({"branches": params["branches"]}):
            outs = [a or b for a, b in zip(outs, _walk(branch, mask[1:], found))]
        return outs
    if prim.name == "custom_vjp_call":
        return [True] * n_out  # the user's bwd gives the cotangents: nothing inside to check
    subs = [sub for key, sub in _sub_jaxprs(params) if len(sub.invars) == len(eqn.invars)]
    if subs:  # jit, closed_call, remat, custom_jvp_call: the body takes the equation's inputs
        return _walk(subs[0], mask, found)
    return [True] * n_out


def _walk_loop(body, consts: list, carry: list, xs: list, found: list) -> list[bool]:
    """Walk a loop body ``(consts, carry, xs) -> (carry, ys)``; carry activity is a fixpoint."""
    while True:
        inner_found: list = []
        outs = _walk(body, consts + carry + xs, inner_found)
        new = [a or b for a, b in zip(carry, outs[:len(carry)])]
        if new == carry:
            found.extend(inner_found)
            return new + outs[len(carry):]
        carry = new


# --- the `bpkit rules` command ------------------------------------------------------------------
def primitive_families() -> dict[str, str]:
    """``{primitive name: rule family module}``, read from the rule modules' sources (the
    ``<name>_p`` objects each module mentions), ``"other"`` for rules registered elsewhere."""
    import bpkit.rules as rules_pkg

    known = {}
    for table in (registry.vjp_rules, registry.fwd_bwd_rules, registry.nondiff_primitives,
                  registry.refused_primitives):
        for p in table:
            known[id(p)] = p.name
    family_of: dict[str, str] = {p.name: "nondiff" for p in registry.nondiff_primitives}
    family_of.update({p.name: "refusals" for p in registry.refused_primitives})
    folder = pathlib.Path(rules_pkg.__file__).parent
    for family in FAMILIES:
        path = folder / f"{family}.py"
        if not path.exists():
            continue
        for token in sorted(set(re.findall(r"\b(\w+_p)\b", path.read_text()))):
            candidates = (getattr(compat, token, None), compat.internal_primitive(token),
                          compat.parallel_primitive(token))
            for p in candidates:
                if p is not None and id(p) in known:
                    family_of.setdefault(known[id(p)], family)
    for p in registry.nondiff_primitives:
        family_of.setdefault(p.name, "nondiff")  # e.g. random_wrap, looked up by string there
    for p in registry.refused_primitives:
        family_of.setdefault(p.name, "refusals")
    return family_of


def format_rule_table() -> str:
    """The supported primitives grouped by rule family module, one family per paragraph."""
    kinds = supported_primitives()
    families = primitive_families()
    lines = [f"bpkit has rules for {sum(k != 'refused' for k in kinds.values())} primitives "
             f"(JAX {jax.__version__}); rule files are bpkit/rules/<family>.py", ""]
    for family in (*FAMILIES, "other"):
        members = sorted(n for n in kinds if families.get(n) == family)
        if not members:
            continue
        lines.append(f"{family} ({len(members)}):")
        row = "   "
        for name in members:
            default = {"nondiff": "nondiff", "refusals": "refused"}.get(family, "vjp")
            tag = "" if kinds[name] == default else f"[{kinds[name]}]"
            item = f" {name}{tag}"
            if len(row) + len(item) > 96:
                lines.append(row)
                row = "   "
            row += item
        lines.append(row)
    return "\n".join(lines)


_DTYPES = {"f16": np.float16, "bf16": jax.numpy.bfloat16, "f32": np.float32, "f64": np.float64,
           "i8": np.int8, "i32": np.int32, "i64": np.int64, "u8": np.uint8, "u32": np.uint32,
           "bool": np.bool_}


def parse_arg_spec(spec: str) -> tuple:
    """``"f32[8,3], i32[8], f32[]"`` -> ``ShapeDtypeStruct``s (``[]`` is a scalar)."""
    out = []
    for m in re.finditer(r"(\w+)\[([\d,\s]*)\]", spec):
        dtype, dims = m.group(1), m.group(2)
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} in --args; use one of "
                             f"{', '.join(_DTYPES)}")
        shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
        out.append(jax.ShapeDtypeStruct(shape, _DTYPES[dtype]))
    if not out and spec.strip():
        raise ValueError(f"could not read --args {spec!r}; write e.g. 'f32[8,3], i32[8]'")
    return tuple(out)


def _load_function(target: str):
    """``path/to/file.py:function`` -> ``(function, module)``; raises ``FileNotFoundError`` /
    ``AttributeError`` with a message."""
    path_str, _, name = target.rpartition(":")
    if not path_str or not name:
        raise FileNotFoundError(f"expected path/to/file.py:function_name, got {target!r}")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"_bpkit_rules_target_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, name):
        raise AttributeError(f"{path} defines no function {name!r}")
    return getattr(module, name), module


def _takes_arguments(fun) -> bool:
    try:
        params = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in params)


def _parse_argnums(text: str | None, nargs: int) -> tuple[int, ...] | None:
    """``--argnums "0,1"`` as indices into the ``nargs`` arguments; ``ValueError`` naming the
    problem if it is not a list of integers or one is out of range."""
    if text is None:
        return None
    try:
        nums = tuple(int(i) for i in text.split(","))
    except ValueError:
        raise ValueError(f"--argnums {text!r} must be argument indices separated by commas, "
                         "such as 0 or 0,1") from None
    bad = [i for i in nums if not 0 <= i < nargs]
    if bad:
        valid = f"0 .. {nargs - 1}" if nargs else "none: it is traced with no arguments"
        raise ValueError(f"--argnums {','.join(map(str, bad))} is out of range: the function "
                         f"takes {nargs} argument{'s' if nargs != 1 else ''} (valid indices: "
                         f"{valid})")
    return nums


def rules_command(argv: list[str]) -> int:
    """``bpkit rules [path/to/file.py:function] [--args SPEC]``; returns the exit status.

    Without a target: print the supported primitives by rule family; exit 0. With one: trace
    the function on ``--args`` (shape specs such as ``'f32[8,3], i32[8]'``), else (if it
    takes arguments) on the file's ``example_args()``, else with no arguments; print the primitives on the
    differentiated path that have no rule; exit 0 if there are none, 1 otherwise, 2 if the
    target cannot be loaded or traced.
    """
    parser = argparse.ArgumentParser(
        prog="bpkit rules",
        description="List the primitives bpkit has rules for, or the ones a function needs but "
                    "lacks.")
    parser.add_argument("target", nargs="?", help="path/to/file.py:function_name")
    parser.add_argument("--args", default=None,
                        help="argument shapes, e.g. 'f32[8,3], i32[8]' (default: the file's "
                             "example_args(), or none)")
    parser.add_argument("--argnums", default=None,
                        help="differentiated arguments, e.g. '0' or '0,1' (default: all)")
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if ns.target is None:
        print(format_rule_table())
        return 0
    try:
        fun, module = _load_function(ns.target)
        if ns.args is not None:
            args = parse_arg_spec(ns.args)
        elif _takes_arguments(fun) and hasattr(module, "example_args"):
            args = tuple(module.example_args())
        else:
            args = ()
        argnums = _parse_argnums(ns.argnums, len(args))
        used = primitives_used(fun, *args)
        missing = unsupported_in(fun, *args, argnums=argnums)
    except (FileNotFoundError, AttributeError, ValueError, TypeError, SyntaxError,
            ImportError) as e:
        print(f"bpkit rules: cannot check {ns.target}: {e}", file=sys.stderr)
        if isinstance(e, TypeError):
            print("The function must take no arguments, or its file must define "
                  "example_args(), or pass --args 'f32[...], ...'.", file=sys.stderr)
        return 2
    kinds = supported_primitives()
    print(f"{ns.target}: {len(used)} primitives used, "
          f"{sum(n in kinds and kinds[n] != 'refused' for n in used)} with bpkit rules")
    if not missing:
        print("every primitive on the differentiated path has a rule")
        return 0
    print(f"{len(missing)} primitive(s) on the differentiated path have no rule:")
    width = max(len(n) for n, _ in missing)
    for name, where in missing:
        print(f"  {name.ljust(width)}  at {where}")
    print("Add a rule with bpkit.register_vjp (see bpkit/rules/ for examples), or wrap the "
          "computation in jax.lax.stop_gradient if it needs no gradient.")
    return 1


__all__: list[Any] = ["supported_primitives", "primitives_used", "primitives_in_jaxpr",
                      "unsupported_in", "rules_command", "format_rule_table", "parse_arg_spec"]

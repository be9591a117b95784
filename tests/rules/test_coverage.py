"""Every primitive that bpkit registers a rule for appears in at least one rule-table case.

The tables are the ``CASES`` of every ``tests/rules/test_*.py``; each case's function is traced
(float32 arguments, complex64 for complex rows) and the primitives of its jaxpr are collected,
including those inside sub-jaxprs (jit, scan, cond branches, remat, custom_jvp/custom_vjp primal
functions). The JVP rule of a ``custom_jvp`` does not count: the case must reach the primitive
itself.
"""
from __future__ import annotations

import contextlib
import importlib
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from bpkit.check.coverage import primitives_in_jaxpr
from bpkit.engine import registry

HERE = pathlib.Path(__file__).parent


def table_modules():
    """The ``tests.rules.test_*`` modules that define ``CASES``, by name."""
    found = {}
    for path in sorted(HERE.glob("test_*.py")):
        if path.stem == "test_coverage":
            continue
        module = importlib.import_module(f"tests.rules.{path.stem}")
        if hasattr(module, "CASES"):
            found[path.stem] = module
    return found


def primitives_of_case(case) -> set[str]:
    """The primitives of the case's jaxpr, traced with each of its dtypes (single precision:
    a complex-only row such as ``real`` emits its primitive only for complex arguments), under
    the case's context (e.g. a mesh) if it has one."""
    names: set[str] = set()
    single = {"float64": "float32", "complex128": "complex64"}
    context = getattr(case, "context", None)
    for dtype in sorted({single.get(d, d) for d in case.dtypes}):
        rng = np.random.default_rng(zlib.crc32(case.name.encode()))
        args = case.make_args(rng, jnp.dtype(dtype))
        with context() if context is not None else contextlib.nullcontext():
            names |= primitives_in_jaxpr(jax.make_jaxpr(case.fun)(*args))
    return names


def test_every_registered_primitive_has_a_case():
    used: dict[str, list[str]] = {}
    problems = []
    for module_name, module in table_modules().items():
        for case in module.CASES:
            try:
                prims = primitives_of_case(case)
            except Exception as e:  # noqa: BLE001  (report every broken case at once)
                problems.append(f"{module_name}::{case.name} does not trace: {e!r}")
                continue
            for p in prims:
                used.setdefault(p, []).append(f"{module_name}::{case.name}")
    registered = {}
    for table, kind in ((registry.vjp_rules, "vjp"), (registry.fwd_bwd_rules, "fwd_bwd"),
                        (registry.nondiff_primitives, "nondiff")):
        for p in table:
            registered[p.name] = (kind, type(p).__module__)
    missing = sorted(name for name in registered if name not in used)
    if missing:
        problems.append(
            f"{len(missing)} registered primitive(s) have no case in any tests/rules/test_*.py "
            "CASES table: " + ", ".join(f"{m} ({registered[m][0]})" for m in missing))
    assert not problems, "\n".join(problems)


def test_tables_exist_for_the_engine_families():
    names = set(table_modules())
    for family in ("elementwise", "structural", "reductions", "linalg", "control", "nondiff"):
        assert f"test_{family}" in names

"""The every-primitive guard: each primitive that JAX's user-facing APIs can put in a program
is either ruled (a VJP or forward-backward rule), declared non-differentiable, or on bpkit's
short list of deliberate refusals (``bpkit/rules/refusals.py``, each with its reason).

The primitives are collected from the installed JAX, so a new JAX release that adds one makes
this test fail until it is classified: every ``Primitive`` object at module level in
``jax.lax``, ``jax.extend.core.primitives``, every module of ``jax._src.lax`` (lax, slicing,
convolution, windowed reductions, control flow, linalg, fft, special, parallel, ...) and of
``jax._src.random``, and the modules that ``jax.checkpoint``/``checkpoint_name``,
``custom_jvp``/``custom_vjp``/``linear_call``, ``jax.sharding.reshard``, ``shard_map``,
``jax.debug`` and the callbacks bind from. (Compiler- and backend-internal primitives of
Pallas, Mosaic, cuDNN, thunks and export are out of scope: no differentiable user program
reaches them.)
"""
from __future__ import annotations

import importlib
import pkgutil

import jax
import pytest

import bpkit.rules  # noqa: F401  (registers every rule)
from bpkit.check.coverage import format_rule_table
from bpkit.engine import compat, registry

PACKAGES = ("jax._src.lax", "jax._src.random")  # walked with every submodule
MODULES = ("jax.lax", "jax.extend.core.primitives", "jax._src.ad_checkpoint",
           "jax._src.custom_derivatives", "jax._src.ad_util", "jax._src.pjit",
           "jax._src.shard_map", "jax._src.debugging", "jax._src.callback")

# Known gaps, by the family that will rule them (open work, not refusals): primitives of the
# installed JAX that no rule covers yet and no user-facing program in the tests emits. Names absent from the installed
# JAX are ignored; an entry that has a rule in this checkout fails the test (remove it).
PENDING_IN_OTHER_BRANCHES = {
    # linalg: the factorizations and solves without a rule yet (eig, tridiagonal_solve, ...)
    **dict.fromkeys([
        "cholesky_update", "eig", "geqp3", "geqrf", "hessenberg",
        "ormqr", "schur", "symmetric_product", "tridiagonal", "tridiagonal_solve"], "linalg"),
    # special: random_gamma_grad is no primitive on either supported end
    **dict.fromkeys([
        "random_gamma_grad"], "complex"),
    # collectives: async start/done halves, ragged/unreduced variants, psend/precv
    **dict.fromkeys([
        "pbroadcast_dynamic", "all_gather_reduced", "ragged_all_to_all", "preduced", "psend",
        "precv", "vary_unreduced_cast", "vary_unreduced_cast_p", "unreduced_psum",
        "unreduced_pmax", "unreduced_pmin", "unreduced_reduce_scatter", "psum_start",
        "psum_done", "psum_invariant_start", "all_gather_start", "all_gather_done",
        "all_gather_reduced_start", "all_to_all_start", "all_to_all_done", "ppermute_start",
        "ppermute_done", "pbroadcast_start", "pbroadcast_done", "reduce_scatter_start",
        "reduce_scatter_done", "unreduced_psum_start", "unreduced_reduce_scatter_start"],
        "collect"),
}


def collect_primitives() -> dict[str, compat.Primitive]:
    """``{name: primitive}`` for every module-level ``Primitive`` in the scanned modules."""
    modules = [importlib.import_module(m) for m in MODULES]
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            modules.append(importlib.import_module(info.name))
    found: dict[str, compat.Primitive] = {}
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, compat.Primitive):
                found.setdefault(value.name, value)
    return found


def classify(p) -> str:
    if p in registry.vjp_rules or p in registry.fwd_bwd_rules:
        return "ruled"
    if p in registry.nondiff_primitives:
        return "nondiff"
    if p in registry.refused_primitives:
        return "refused"
    if p.name in PENDING_IN_OTHER_BRANCHES:
        return "pending"
    return "missing"


def test_every_primitive_is_ruled_nondiff_or_refused():
    kinds = {name: classify(p) for name, p in collect_primitives().items()}
    missing = sorted(n for n, k in kinds.items() if k == "missing")
    counts = {k: sum(v == k for v in kinds.values()) for k in ("ruled", "nondiff", "refused",
                                                              "pending")}
    assert not missing, (
        f"JAX {jax.__version__} has {len(missing)} primitive(s) that bpkit neither rules, "
        f"declares non-differentiable, nor refuses: {', '.join(missing)}. Add a rule "
        f"(bpkit/rules/<family>.py), a nondiff entry, or a commented refusal. ({counts})")


def test_pending_entries_are_not_ruled_here():
    stale = sorted(p.name for p in (*registry.vjp_rules, *registry.fwd_bwd_rules,
                                    *registry.nondiff_primitives, *registry.refused_primitives)
                   if p.name in PENDING_IN_OTHER_BRANCHES)
    assert not stale, f"remove from PENDING_IN_OTHER_BRANCHES (now handled): {stale}"


@pytest.mark.parametrize("primitive", sorted(registry.refused_primitives, key=lambda p: p.name),
                         ids=lambda p: p.name)
def test_refusals_explain_themselves(primitive):
    why = registry.refused_primitives[primitive]
    assert why[0].isalpha() and why.rstrip().endswith((".", ")")) and len(why) > 40, why


def test_bpkit_rules_lists_the_refusals():
    table = format_rule_table()
    section = table[table.index("refusals ("):]
    for p in registry.refused_primitives:
        assert p.name in section

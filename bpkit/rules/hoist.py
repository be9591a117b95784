"""Weight-gradient contractions taken out of the backward scan (the scan rule's helper).

Backpropagation through time sums a loop-invariant input's cotangent over the steps. For a
weight used as ``h_t @ W`` in the body, each step's term is a matrix product of two per-step
values, ``h_t^T @ g_t`` (``g_t``: the cotangent of the product's output), added into an
accumulator carried by the backward loop: ``T`` small products and ``T`` additions of a
weight-sized array. Since summing over ``t`` commutes with the product,

    sum_t h_t^T g_t  =  H^T G      (H, G: the per-step values stacked over time)

so the loop only stacks ``g_t`` (``h_t`` is already stacked, as a residual of the forward
loop) and one product after it contracts the time axis together with the batch axis: what
cuDNN and PyTorch's fused RNN kernels do. Linear re-layouts between the product and the
cotangent (a transpose, a dtype conversion, a reshape) commute with the sum too and run once
after it. Measured gain: see docs/benchmarks.md (GRU and LSTM rows).

``plan`` finds such terms in the tangent half of the scan body's joint jaxpr; every other
term of a loop-invariant cotangent stays in the loop.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import jax.extend.core.primitives as prims
from jax import lax

from bpkit.engine import compat

_ADDS = {p for p in (lax.add_p, getattr(prims, "add_any_p", None)) if p is not None}
_RELAYOUTS = {lax.transpose_p, lax.convert_element_type_p, lax.reshape_p}


@dataclass
class Term:
    """``relayouts(dot(a_t, b_t))`` summed over steps: ``dot`` is the per-step product."""

    dot: object        # the dot_general equation
    relayouts: list    # equations applied to its output, in order


def plan(tangent_eqns, const_cts, per_step, other_outvars):
    """For each loop-invariant cotangent ``const_cts[i]``: ``(terms, rest)``, the hoistable
    product terms and the variables (or literals) still summed in the loop. ``per_step(v)``
    says whether ``v`` differs per step (a residual or a cotangent-side value);
    ``other_outvars`` are the joint's other outputs (a variable they use is not hoisted)."""
    producer = {v: e for e in tangent_eqns for v in e.outvars}
    uses = Counter(v for e in tangent_eqns for v in e.invars if isinstance(v, compat.Var))
    uses.update(v for v in [*const_cts, *other_outvars] if isinstance(v, compat.Var))
    result = []
    for out in const_cts:
        terms, rest, stack = [], [], [out]
        while stack:
            v = stack.pop()
            e = producer.get(v) if isinstance(v, compat.Var) else None
            if e is not None and e.primitive in _ADDS and uses[v] == 1:
                stack.extend(e.invars)
                continue
            chain, w = [], v
            while e is not None and e.primitive in _RELAYOUTS and uses[w] == 1:
                chain.append(e)
                w = e.invars[0]
                e = producer.get(w) if isinstance(w, compat.Var) else None
            if (e is not None and e.primitive is lax.dot_general_p and uses[w] == 1
                    and all(isinstance(u, compat.Var) and per_step(u) for u in e.invars)):
                terms.append(Term(e, chain[::-1]))
            else:
                rest.append(v)
        result.append((terms, rest))
    return result


def loop_outputs(plans) -> list:
    """The per-step operands of every hoisted product, each once, in a fixed order."""
    seen = []
    for terms, _ in plans:
        for term in terms:
            seen.extend(u for u in term.dot.invars if u not in seen)
    return seen


def contract_over_time(term: Term, a, b):
    """``relayouts(sum_t dot(a[t], b[t]))`` as one product over the stacked operands."""
    (ca, cb), (ba, bb) = term.dot.params["dimension_numbers"]
    shift = lambda dims: tuple(d + 1 for d in dims)  # noqa: E731 (axis 0 is time)
    out = lax.dot_general(a, b, (((0, *shift(ca)), (0, *shift(cb))), (shift(ba), shift(bb))),
                          precision=term.dot.params.get("precision"),
                          preferred_element_type=term.dot.params.get("preferred_element_type"))
    for eqn in term.relayouts:
        out = compat.eval_eqn(eqn, [out])[0]
    return out

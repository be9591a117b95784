"""Primitives whose outputs carry no cotangent.

Their JAX derivative is zero wherever it is defined (``floor``, ``sign``, ``round``), they return
integers or booleans (comparisons, ``argmax``, ``iota``, bit operations), they produce random
bits, or they exist to stop gradients. The engine evaluates them and never puts them on the
tape; what flows into them gets a symbolic-zero cotangent.
"""
from __future__ import annotations

import jax.extend.core.primitives as prims

from bpkit.engine.registry import register_nondiff

_NAMES = [
    # zero derivative almost everywhere (JAX's JVP is zero too; sign, whose complex derivative
    # is not zero, has its rule in elementwise.py)
    "floor_p", "ceil_p", "round_p", "is_finite_p", "stop_gradient_p",
    # comparisons and logic
    "eq_p", "ne_p", "lt_p", "le_p", "gt_p", "ge_p", "and_p", "or_p", "not_p", "xor_p",
    "reduce_and_p", "reduce_or_p", "reduce_xor_p",
    # integer results
    "iota_p", "argmax_p", "argmin_p", "population_count_p", "clz_p",
    "shift_left_p", "shift_right_arithmetic_p", "shift_right_logical_p",
    # random numbers: keys and bits are not differentiable
    "random_seed_p", "random_bits_p", "random_wrap_p", "random_unwrap_p", "random_split_p",
    "random_fold_in_p", "threefry2x32_p", "rng_bit_generator_p", "rng_uniform_p",
    # bookkeeping
    "create_token_p", "after_all_p",
]


def _lookup(name):
    p = getattr(prims, name, None)
    if p is None:  # random_wrap/unwrap live in jax._src.prng on every supported release
        from jax._src.random import prng  # not re-exported by jax.extend
        p = getattr(prng, name, None)
    return p


register_nondiff(*[p for p in map(_lookup, _NAMES) if p is not None])

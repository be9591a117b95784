"""Primitives whose outputs carry no cotangent.

Their JAX derivative is zero wherever it is defined (``floor``, ``sign``, ``round``,
``bitcast_convert_type``), they return integers or booleans (comparisons, ``argmax``, ``iota``,
bit operations), they produce random bits or keys, they create values without reading any
(``empty``), or they exist to stop gradients or for bookkeeping. The engine
evaluates them and never puts them on the tape; what flows into them gets a symbolic-zero
cotangent. (The engine also skips, without any registration, every equation that has no
floating-point output; listing the integer- and boolean-valued primitives here documents them
in ``bpkit rules`` and in the every-primitive guard.)

Deliberate refusals (``while``, custom reductions, callbacks, ...) are in ``refusals.py``.
"""
from __future__ import annotations

from bpkit.engine import compat
from bpkit.engine.registry import register_nondiff

_NAMES = [
    # zero derivative almost everywhere (JAX's JVP is zero too; sign, whose complex derivative
    # is not zero, has its rule in elementwise.py)
    "floor_p", "ceil_p", "round_p", "is_finite_p", "stop_gradient_p",
    "bitcast_convert_type_p",
    # comparisons and logic (``*_to``: the total-order comparisons of jnp.sort/searchsorted)
    "eq_p", "ne_p", "lt_p", "le_p", "gt_p", "ge_p", "eq_to_p", "lt_to_p", "le_to_p",
    "and_p", "or_p", "not_p", "xor_p", "reduce_and_p", "reduce_or_p", "reduce_xor_p",
    # integer results
    "iota_p", "argmax_p", "argmin_p", "population_count_p", "clz_p", "mulhi_p",
    "shift_left_p", "shift_right_arithmetic_p", "shift_right_logical_p", "platform_index_p",
    # random numbers: keys and bits are not differentiable
    "random_seed_p", "random_bits_p", "random_wrap_p", "random_unwrap_p", "random_split_p",
    "random_fold_in_p", "random_clone_p", "threefry2x32_p", "threefry4x32_p", "philox2x32_p",
    "philox4x32_p", "iota_2x32_shape_p", "rng_bit_generator_p", "rng_uniform_p",
    # values that do not depend on any input's value
    "empty_p", "empty2_p",
    # bookkeeping
    "create_token_p", "after_all_p", "dce_sink_p",
    # jax.debug.print / jax.debug.callback / inspect_array_sharding: no outputs at all
    "debug_callback_p", "debug_print_p", "inspect_sharding_p",
]

register_nondiff(*[p for p in map(compat.internal_primitive, _NAMES) if p is not None])

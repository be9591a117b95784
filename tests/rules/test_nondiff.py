"""Table for bpkit/rules/nondiff.py, row for row: every non-differentiable primitive passes no
cotangent. Each case is ``x * g(x)`` (or ``x + ...``) with ``g`` built from the primitive, so
the gradient is exactly ``g(x)``: any cotangent leaking through ``g`` would show up.

Also: a ``while_loop`` over integers alone needs no rule, and a primitive without a rule raises
``bpkit.UnsupportedPrimitiveError`` until a rule is registered with ``bpkit.register_vjp``.
"""
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.interpreters import mlir

import bpkit
from bpkit.check.coverage import unsupported_in
from bpkit.engine import registry
from jax._src import core as _jax_core
from jax._src.lax import lax as _lax_internal  # empty, empty2, dce_sink: not in jax.lax everywhere
from jax._src.random import philox2x32 as _p2, philox4x32 as _p4, threefry4x32 as _t4
from tests.rules.harness import Case, args, const, parametrize, assert_case_parity, uniform

S = (3, 4)
_MEMORY = getattr(_jax_core, "MemorySpace", None) and _jax_core.MemorySpace.Device
f32 = lambda b, x: b.astype(x.dtype)  # noqa: E731  a mask or integer as x's dtype


def as_int(x):
    return lax.convert_element_type(jnp.floor(x * 8), jnp.int32)


def times(name, g, **kw):
    """Row ``x * g(x)``: the gradient must be exactly ``g(x)``."""
    return Case(name, lambda x: x * g(x), args(uniform(*S, **kw)), fd=False)


def key_case(name, g, make_key=lambda s: jax.random.key(s)):
    """Row ``x * g(key)`` with a PRNG key argument."""
    return Case(name, lambda x, key: x * g(key, x), lambda rng, dt: (
        jnp.asarray(rng.uniform(-2, 2, S), dt), make_key(int(rng.integers(1 << 20)))))


def bits(key, x):
    return f32(jax.random.bits(key, S, jnp.uint32) >> 28, x)


def raw_bits(random_bits, seed, s, x):
    """Bits from one of JAX's PRNG implementations called directly (``jax.random`` hides
    their primitives inside ``random_bits``), as ``x``'s dtype."""
    return f32(random_bits(seed(s), 32, S) >> 28, x)


CASES = [
    # zero derivative almost everywhere
    times("floor", jnp.floor),
    times("ceil", jnp.ceil),
    times("round", jnp.round),
    times("is_finite", lambda x: f32(jnp.isfinite(x / (x - x[0, 0])), x)),
    times("stop_gradient", lax.stop_gradient),
    times("bitcast_convert_type",
          lambda x: f32(lax.bitcast_convert_type(x, jnp.int32 if x.dtype == jnp.float32
                                                 else jnp.int64) >> 60, x)),
    # comparisons and logic
    times("eq", lambda x: f32(x == x[0, 0], x)),
    times("ne", lambda x: f32(x != x[0, 0], x)),
    times("lt", lambda x: f32(x < 0.5, x)),
    times("le", lambda x: f32(x <= 0.5, x)),
    times("gt", lambda x: f32(x > 0.5, x)),
    times("ge", lambda x: f32(x >= 0.5, x)),
    times("eq_to", lambda x: f32(lax.eq_to_p.bind(x, x[::-1]), x)),
    times("lt_to", lambda x: f32(lax.lt_to_p.bind(x, x[::-1]), x)),
    times("le_to", lambda x: f32(lax.le_to_p.bind(x, x[::-1]), x)),
    times("and", lambda x: f32((x > 0) & (x < 1), x)),
    times("or", lambda x: f32((x < 0) | (x > 1), x)),
    times("not", lambda x: f32(~(x > 0), x)),
    times("xor", lambda x: f32((x > 0) ^ (x > 1), x)),
    times("reduce_and", lambda x: f32(lax.reduce_and(x > -1, (1,)), x)[:, None]),
    times("reduce_or", lambda x: f32(lax.reduce_or(x > 1, (0,)), x)[None, :]),
    times("reduce_xor", lambda x: f32(lax.reduce_xor(x > 0, (1,)), x)[:, None]),
    # integer results
    times("iota", lambda x: lax.broadcasted_iota(x.dtype, S, 1)),
    times("argmax", lambda x: f32(jnp.argmax(x, axis=1), x)[:, None]),
    times("argmin", lambda x: f32(jnp.argmin(x, axis=0), x)[None, :]),
    times("population_count", lambda x: f32(lax.population_count(as_int(x)), x)),
    times("clz", lambda x: f32(lax.clz(as_int(x)), x)),
    times("mulhi", lambda x: f32(lax.mulhi(as_int(x), jnp.int32(1 << 30)), x)),
    times("shift_left", lambda x: f32(lax.shift_left(as_int(x), jnp.int32(2)), x)),
    times("shift_right_arithmetic",
          lambda x: f32(lax.shift_right_arithmetic(as_int(x), jnp.int32(1)), x)),
    times("shift_right_logical",
          lambda x: f32(lax.shift_right_logical(as_int(x), jnp.int32(1)), x)),
    times("platform_index", lambda x: lax.platform_dependent(x, cpu=jnp.sin, default=jnp.cos)),
    # random numbers
    Case("random_seed", lambda x, s: x * bits(jax.random.key(s), x),
         args(uniform(*S), const(jnp.int32(7)))),
    key_case("random_bits", bits),
    key_case("random_wrap_raw_uint32_key", bits, make_key=jax.random.PRNGKey),
    key_case("random_unwrap_key_data", lambda k, x: f32(jax.random.key_data(k)[0] >> 30, x)),
    key_case("random_split", lambda k, x: bits(jax.random.split(k)[1], x)),
    key_case("random_fold_in", lambda k, x: bits(jax.random.fold_in(k, 3), x)),
    key_case("random_clone", lambda k, x: bits(jax.random.clone(k), x)),
    key_case("random_normal_dropout_mask",
             lambda k, x: f32(jax.random.bernoulli(k, 0.7, S), x) / 0.7),
    Case("threefry2x32",
         lambda x, k: x * f32(jex.random.threefry_2x32(k, jnp.arange(12, dtype=jnp.uint32))
                              .reshape(S) >> 29, x),
         args(uniform(*S), const(jnp.array([1, 2], jnp.uint32)))),
    Case("threefry4x32", lambda x, s: x * raw_bits(_t4.threefry4x32_random_bits, _t4.threefry4x32_seed, s, x),
         args(uniform(*S), const(jnp.uint32(5)))),
    Case("philox2x32_and_iota_2x32_shape",
         lambda x, s: x * raw_bits(_p2.philox2x32_random_bits, _p2.philox2x32_seed, s, x),
         args(uniform(*S), const(jnp.uint32(5)))),
    Case("philox4x32", lambda x, s: x * raw_bits(_p4.philox4x32_random_bits, _p4.philox4x32_seed, s, x),
         args(uniform(*S), const(jnp.uint32(5)))),
    Case("rng_bit_generator",
         lambda x, k: x * f32(lax.rng_bit_generator(k, S, dtype=jnp.uint32)[1] >> 29, x),
         args(uniform(*S), const(jnp.array([1, 2, 3, 4], jnp.uint32)))),
    Case("rng_uniform", lambda x: x + 0 * jnp.sum(lax.rng_uniform(
        jnp.zeros((), x.dtype), jnp.ones((), x.dtype), S)), args(uniform(*S))),
    # values that do not depend on any input's value
    times("empty", lambda x: 0 * _lax_internal.empty(S, x.dtype) + 1),
    times("empty2", lambda x: 0 * _lax_internal.empty2(x.dtype, memory_space=_MEMORY) + 1),
    # bookkeeping
    Case("create_token_after_all",
         lambda x: (lax.after_all(lax.create_token(), lax.create_token()), x * 2)[1],
         args(uniform(*S))),
    times("dce_sink", lambda x: (_lax_internal.dce_sink(x), jnp.cos(x))[1]),
    times("debug_print", lambda x: (jax.debug.print("{}", x[0, 0], ordered=False),
                                    jnp.cos(x))[1]),
    times("debug_callback", lambda x: (jax.debug.callback(lambda v: None, x), jnp.cos(x))[1]),
    times("inspect_sharding",
          lambda x: (jax.debug.inspect_array_sharding(x, callback=lambda s: None),
                     jnp.cos(x))[1]),
]


@parametrize(CASES)
def test_nondiff(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


@pytest.mark.parametrize("fun", [
    lambda x: jnp.sum(jnp.floor(x)) + jnp.sum(x * 0),
    lambda x: jnp.sum(jnp.sign(x) * jnp.round(x)),
    lambda x: jnp.sum(lax.stop_gradient(x) ** 2),
    lambda x: jnp.sum(jnp.argsort(x).astype(x.dtype)) + jnp.sum(jnp.ceil(x)),
    lambda x: jnp.sum(jnp.where(x > 0, 1.0, -1.0).astype(x.dtype)),
])
def test_gradient_is_exactly_zero(fun):
    x = jnp.linspace(-2.3, 2.1, 12).reshape(3, 4)
    g = bpkit.grad(fun)(x)
    assert g.dtype == x.dtype and g.shape == x.shape
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_while_loop_on_non_differentiated_values_is_fine():
    def f(x, n):
        k = lax.while_loop(lambda c: c < n, lambda c: c + 1, 0)
        return x * k.astype(x.dtype)
    assert bpkit.grad(f)(jnp.float32(2.0), 3) == 3.0


# --- a primitive without a rule ----------------------------------------------------------------
my_sin_p = jex.core.Primitive("my_sin")
my_sin_p.def_impl(jnp.sin)
my_sin_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))


def _uses_my_sin(x):
    return jnp.sum(my_sin_p.bind(x * 2.0))  # the line the error must point at


def test_unregistered_primitive_names_primitive_line_and_fix():
    assert not registry.has_rule(my_sin_p)
    with pytest.raises(bpkit.UnsupportedPrimitiveError) as err:
        bpkit.grad(_uses_my_sin)(jnp.ones(3))
    msg = str(err.value)
    line = _uses_my_sin.__code__.co_firstlineno + 1
    assert "'my_sin'" in msg
    assert f"test_nondiff.py:{line}" in msg, msg
    assert "register_vjp" in msg


def test_register_vjp_makes_a_custom_primitive_work():
    try:
        @bpkit.register_vjp(my_sin_p)
        def _my_sin_vjp(ct, x, *, out):
            return [ct * jnp.cos(x)]

        x = jnp.array([0.1, 0.5, -1.0])
        g = bpkit.grad(_uses_my_sin)(x)
        np.testing.assert_allclose(g, 2.0 * jnp.cos(2.0 * x), rtol=1e-12)
        g_jit = jax.jit(bpkit.grad(_uses_my_sin))(x)
        np.testing.assert_allclose(g_jit, g, rtol=1e-12)
    finally:
        registry.vjp_rules.pop(my_sin_p, None)


# --- equations without a floating-point output need no rule ------------------------------------
flag_p = jex.core.Primitive("bpkit_test_flag")  # a rule-less primitive with a boolean output
flag_p.def_impl(lambda x: x > 0)
flag_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, jnp.bool_))
mlir.register_lowering(flag_p, mlir.lower_fun(lambda x: x > 0, multiple_results=False))


def test_equations_without_float_outputs_are_skipped():
    """The engine never looks up a rule for an equation whose outputs are all integer or
    boolean (they carry no cotangent), even when its inputs are differentiated."""
    f = lambda x: jnp.sum(jnp.where(flag_p.bind(x), x * x, -x))  # noqa: E731
    x = jnp.array([-1.5, 0.5, 2.0])
    assert not registry.has_rule(flag_p)
    np.testing.assert_allclose(bpkit.grad(f)(x), jnp.where(x > 0, 2 * x, -1.0), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(bpkit.grad(f))(x), bpkit.grad(f)(x), rtol=1e-12)
    assert unsupported_in(f, x) == []


def test_interp_and_searchsorted_differentiate():
    """jnp.interp reaches total-order comparisons (lt_to/le_to on JAX 0.10, an integer-valued
    hijax searchsorted on 0.12): none of them needs a rule."""
    xp = jnp.linspace(0.0, 3.0, 7)
    f = lambda x, fp: jnp.sum(jnp.interp(x, xp, fp) ** 2)  # noqa: E731
    x, fp = jnp.array([0.3, 1.7, 2.9, 3.5]), jnp.sin(xp)
    for a, b in zip(bpkit.grad(f, (0, 1))(x, fp), jax.grad(f, (0, 1))(x, fp)):
        np.testing.assert_allclose(a, b, rtol=1e-12)

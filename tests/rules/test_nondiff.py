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

import bpkit
from bpkit.engine import registry
from tests.rules.harness import Case, args, const, parametrize, assert_case_parity, uniform

S = (3, 4)
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


CASES = [
    # zero derivative almost everywhere
    times("floor", jnp.floor),
    times("ceil", jnp.ceil),
    times("round", jnp.round),
    times("is_finite", lambda x: f32(jnp.isfinite(x / (x - x[0, 0])), x)),
    times("stop_gradient", lax.stop_gradient),
    # comparisons and logic
    times("eq", lambda x: f32(x == x[0, 0], x)),
    times("ne", lambda x: f32(x != x[0, 0], x)),
    times("lt", lambda x: f32(x < 0.5, x)),
    times("le", lambda x: f32(x <= 0.5, x)),
    times("gt", lambda x: f32(x > 0.5, x)),
    times("ge", lambda x: f32(x >= 0.5, x)),
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
    times("shift_left", lambda x: f32(lax.shift_left(as_int(x), jnp.int32(2)), x)),
    times("shift_right_arithmetic",
          lambda x: f32(lax.shift_right_arithmetic(as_int(x), jnp.int32(1)), x)),
    times("shift_right_logical",
          lambda x: f32(lax.shift_right_logical(as_int(x), jnp.int32(1)), x)),
    # random numbers
    Case("random_seed", lambda x, s: x * bits(jax.random.key(s), x),
         args(uniform(*S), const(jnp.int32(7)))),
    key_case("random_bits", bits),
    key_case("random_wrap_raw_uint32_key", bits, make_key=jax.random.PRNGKey),
    key_case("random_unwrap_key_data", lambda k, x: f32(jax.random.key_data(k)[0] >> 30, x)),
    key_case("random_split", lambda k, x: bits(jax.random.split(k)[1], x)),
    key_case("random_fold_in", lambda k, x: bits(jax.random.fold_in(k, 3), x)),
    key_case("random_normal_dropout_mask",
             lambda k, x: f32(jax.random.bernoulli(k, 0.7, S), x) / 0.7),
    Case("threefry2x32",
         lambda x, k: x * f32(jex.random.threefry_2x32(k, jnp.arange(12, dtype=jnp.uint32))
                              .reshape(S) >> 29, x),
         args(uniform(*S), const(jnp.array([1, 2], jnp.uint32)))),
    Case("rng_bit_generator",
         lambda x, k: x * f32(lax.rng_bit_generator(k, S, dtype=jnp.uint32)[1] >> 29, x),
         args(uniform(*S), const(jnp.array([1, 2, 3, 4], jnp.uint32)))),
    Case("rng_uniform", lambda x: x + 0 * jnp.sum(lax.rng_uniform(
        jnp.zeros((), x.dtype), jnp.ones((), x.dtype), S)), args(uniform(*S))),
    # bookkeeping
    Case("create_token_after_all",
         lambda x: (lax.after_all(lax.create_token(), lax.create_token()), x * 2)[1],
         args(uniform(*S))),
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

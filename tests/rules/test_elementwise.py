"""Parity table for bpkit/rules/elementwise.py, row for row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import bpkit
from bpkit.engine import compat
from tests.rules.harness import (COMPLEX, FLOATS, WITH_COMPLEX, Case, args, assert_case_parity,
                                 const, parametrize, real_arg, uniform)

S = (3, 4)
pos = dict(lo=0.5, hi=2.0)  # domain of log, sqrt, pow bases...
unit = dict(lo=-0.9, hi=0.9)  # domain of asin, acos, atanh, erf_inv


def holomorphic(also_complex):
    """Case options for a row whose complex derivative is the real formula (``ct * f'(x)``):
    complex64 (the VJP with a complex cotangent) by default, complex128 with finite
    differences under ``-m slow``."""
    if not also_complex:
        return dict(dtypes=FLOATS)
    return dict(dtypes=WITH_COMPLEX, slow_modes=("complex128-eager",))


def _polynomial(x, *coeffs):
    """``lax.polynomial`` (a primitive from JAX 0.12 on), or Horner's rule written out."""
    if hasattr(lax, "polynomial"):
        return lax.polynomial(x, coeffs)
    out = jnp.zeros_like(x) + coeffs[-1]
    for c in coeffs[-2::-1]:
        out = out * x + c
    return out


def _int_pow(x, n):
    """``x ** n`` with an integer array exponent (JAX's own derivative of it needs standard
    dtype promotion, which the strict test configuration turns off)."""
    with jax.numpy_dtype_promotion("standard"):
        return lax.pow(x, n)




def unary(name, fun, also_complex=False, **dom):
    """Row ``fun(x)``; ``also_complex`` adds complex rows (both parts of ``x`` in the domain)."""
    return Case(name, fun, args(uniform(*S, **dom)), **holomorphic(also_complex))


def binary(name, fun, dom_x=None, dom_y=None, also_complex=False):
    return Case(name, fun, args(uniform(*S, **(dom_x or {})), uniform(*S, **(dom_y or {}))),
                argnums=(0, 1), **holomorphic(also_complex))


CASES = [
    # arithmetic
    binary("add", lax.add, also_complex=True),
    Case("add_scalar_literal", lambda x: x + 2.0, args(uniform(*S)), **holomorphic(True)),
    binary("sub", lax.sub, also_complex=True),
    binary("mul", lax.mul, also_complex=True),
    Case("mul_scalar_operand", lambda x, s: x * s, args(uniform(*S), uniform()), argnums=(0, 1),
         **holomorphic(True)),
    binary("div", lax.div, dom_y=pos, also_complex=True),
    unary("neg", lax.neg, also_complex=True),
    binary("rem", lax.rem, dom_x=dict(lo=0.1, hi=3.0), dom_y=dict(lo=0.7, hi=1.3)),
    binary("max", lax.max),
    Case("max_ties_split_evenly", lambda x: lax.max(x, jnp.zeros_like(x)),
         args(const(jnp.array([-1.0, 0.0, 0.0, 2.0]))), fd=False),
    binary("min", lax.min),
    Case("min_ties_split_evenly", lambda x, y: lax.min(x, y),
         args(const(jnp.array([1.0, 2.0])), const(jnp.array([1.0, 3.0]))), argnums=(0, 1), fd=False),
    # powers and roots
    binary("pow", lax.pow, dom_x=pos, also_complex=True),
    Case("pow_zero_exponent", lambda x, y: lax.pow(x, y),
         args(uniform(3, **pos), const(jnp.array([0.0, 1.0, 2.0]))), argnums=(0, 1), fd=False),
    Case("pow_integer_exponent", _int_pow,
         args(uniform(4, lo=-2.0, hi=2.0), const(jnp.array([0, 1, 2, 3], jnp.int32)))),
    Case("pow_integer_exponent_zero_base", _int_pow,
         args(const(jnp.array([0.0, 0.0, 0.0])), const(jnp.array([0, 1, 2], jnp.int32))), fd=False),
    Case("pow_literal_base", lambda y: jnp.power(2.0, y), args(uniform(*S))),
    Case("pow_literal_exponent", lambda x: jnp.power(x, 2.5), args(uniform(*S, **pos))),
    Case("integer_pow", lambda x: lax.integer_pow(x, 3) + lax.integer_pow(x, -2) + lax.integer_pow(x, 1)
         + lax.integer_pow(x, 0), args(uniform(*S, **pos)), **holomorphic(True)),
    unary("square", lax.square, also_complex=True),
    unary("sqrt", lax.sqrt, **pos, also_complex=True),
    unary("rsqrt", lax.rsqrt, **pos, also_complex=True),
    unary("cbrt", lax.cbrt, **pos),
    # exponentials and logarithms
    unary("exp", lax.exp, also_complex=True),
    unary("exp2", lax.exp2, also_complex=True),
    unary("log", lax.log, **pos, also_complex=True),
    unary("log1p", lax.log1p, **pos, also_complex=True),
    unary("expm1", lax.expm1, also_complex=True),
    unary("tanh", lax.tanh, also_complex=True),
    unary("logistic", lax.logistic, also_complex=True),
    unary("log2", jnp.log2, **pos),
    # error functions and special functions
    unary("erf", lax.erf),
    unary("erfc", lax.erfc),
    unary("erf_inv", lax.erf_inv, **unit),
    unary("lgamma", lax.lgamma, **pos),
    unary("digamma", lax.digamma, **pos),
    # trigonometric and hyperbolic
    unary("sin", lax.sin, also_complex=True),
    unary("cos", lax.cos, also_complex=True),
    unary("tan", lax.tan, **unit, also_complex=True),
    unary("asin", lax.asin, **unit, also_complex=True),
    unary("acos", lax.acos, **unit, also_complex=True),
    unary("atan", lax.atan, also_complex=True),
    binary("atan2", lax.atan2, dom_y=pos),
    unary("sinh", lax.sinh, also_complex=True),
    unary("cosh", lax.cosh, also_complex=True),
    unary("asinh", lax.asinh, also_complex=True),
    unary("acosh", lax.acosh, lo=1.5, hi=3.0, also_complex=True),
    unary("atanh", lax.atanh, **unit, also_complex=True),
    Case("nextafter", lambda x, y: lax.nextafter(x, y), args(uniform(*S), uniform(*S)),
         argnums=(0, 1), fd=False,  # a one-ulp step: finite differences cannot see it
         marks=(pytest.mark.skipif(compat.JAX_VERSION < (0, 12), reason="jax.grad has no "
                                   "nextafter rule before JAX 0.12 to compare with"),)),
    # sign-dependent
    Case("abs", lax.abs, args(uniform(*S)), dtypes=WITH_COMPLEX),  # not holomorphic
    Case("abs_at_zero", lax.abs, args(const(jnp.array([-1.0, 0.0, 1.0]))), fd=False,
         dtypes=WITH_COMPLEX),
    # JAX 0.10 takes sign's complex derivative to be zero, so finite differences disagree there.
    Case("sign", lambda x: x * lax.sign(x), args(uniform(*S)), dtypes=WITH_COMPLEX,
         fd=compat.COMPLEX_SIGN_IS_DIFFERENTIABLE),
    Case("sign_at_zero", lambda x: x * lax.sign(x), args(const(jnp.array([-1.0, 0.0, 2.0]))),
         fd=False, dtypes=WITH_COMPLEX),
    Case("real", lax.real, args(uniform(*S)), dtypes=COMPLEX),
    Case("imag", lax.imag, args(uniform(*S)), dtypes=COMPLEX),
    Case("complex", lax.complex, args(real_arg(uniform(*S)), real_arg(uniform(*S))),
         argnums=(0, 1), dtypes=COMPLEX),
    Case("complex_scalar_operand", lambda x, y: lax.complex(x, y),
         args(real_arg(uniform(*S)), real_arg(uniform())), argnums=(0, 1), dtypes=COMPLEX),
    Case("conj", lax.conj, args(uniform(*S)), dtypes=COMPLEX),
    Case("conj_of_real", lambda x: lax.conj(x) * (1 + 2j), args(real_arg(uniform(*S))),
         dtypes=COMPLEX),
    Case("real_loss_of_complex", lambda z: jnp.sum(jnp.abs(z * lax.conj(z) + z) ** 2)
         + jnp.real(z[0, 0]) * jnp.imag(z[1, 1]), args(uniform(*S)), dtypes=COMPLEX),
    # selection
    Case("select_n", lambda p, x, y: lax.select_n(p, x, y),
         args(const(jnp.array([[True, False], [False, True]])), uniform(2, 2), uniform(2, 2)),
         argnums=(1, 2), **holomorphic(True)),
    Case("select_n_three_way", lambda p, x, y, z: lax.select_n(p, x, y, z),
         args(const(jnp.array([0, 1, 2, 1], jnp.int32)), uniform(4), uniform(4), uniform(4)),
         argnums=(1, 2, 3)),
    Case("select_n_literal_predicate", lambda x: jnp.where(True, x, 0.0) + jnp.where(False, x, 1.0),
         args(uniform(*S))),
    Case("select_n_scalar_predicate", lambda p, x, y: lax.select_n(p, x, y),
         args(const(jnp.array(True)), uniform(*S), uniform(*S)), argnums=(1, 2)),
    Case("clamp", lambda lo, x, hi: lax.clamp(lo, x, hi),
         args(uniform(*S, lo=-1.5, hi=-0.5), uniform(*S), uniform(*S, lo=0.5, hi=1.5)),
         argnums=(0, 1, 2)),
    Case("clamp_at_bounds", lambda x: lax.clamp(jnp.asarray(-1.0, x.dtype), x, jnp.asarray(1.0, x.dtype)),
         args(const(jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0]))), fd=False),
    Case("one_minus_square", getattr(lax, "one_minus_square", lambda x: 1 - x * x),  # JAX >= 0.11
         args(uniform(*S)), **holomorphic(True)),
    # add_any: JAX's own backward pass sums the two uses of y with it
    Case("add_any_in_a_jax_grad", lambda x: jax.grad(lambda y: jnp.sum(jnp.sin(y) * y))(x),
         args(uniform(*S))),
    Case("polynomial", _polynomial, args(uniform(*S), uniform(), uniform(1, 4), uniform(*S)),
         argnums=(0, 1, 2, 3)),
    Case("polynomial_constant", lambda x, a: _polynomial(x, a), args(uniform(*S), uniform()),
         argnums=(0, 1)),
]


@parametrize(CASES)
def test_elementwise(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


def test_pow_at_zero_exponent_like_jax():
    """JAX's testPowSecondDerivative: at x = y = 0, d(x**y)/dx = y * x**(y-1) = 0 * inf is nan
    (dy is 0); the Hessian at (4, 0) is symmetric, [[0, 1/4], [1/4, log(4)**2]]."""
    def derivatives(x, y):
        grad = bpkit.grad(lax.pow, (0, 1))
        return grad(0.0 * x, 0.0 * y), [bpkit.grad(lambda x, y: grad(x, y)[i], (0, 1))(x, y)
                                        for i in (0, 1)]
    (gx, gy), hess = jax.jit(derivatives)(4.0, 0.0)
    assert np.isnan(gx) and gy == 0.0
    assert np.isnan(jax.grad(lax.pow)(0.0, 0.0))
    np.testing.assert_allclose(np.array(hess), [[0.0, 0.25], [0.25, np.log(4.0) ** 2]], rtol=1e-12)

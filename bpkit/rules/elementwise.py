"""VJP rules of elementwise primitives: arithmetic, powers, exponentials, trigonometry, selection.

Each line is the derivative ``ct * df/dx`` written out. Conventions at kinks follow JAX exactly:
``max``/``min`` split the cotangent evenly between tied operands; ``abs`` passes ``+ct`` at 0;
``clamp`` gives the operand nothing at either bound; ``floor``, ``ceil``, ``round`` have zero
derivative (registered in ``nondiff.py``), and so has ``sign`` of a real number.

Complex numbers follow JAX's convention: a VJP is the *transpose* of the derivative, not its
adjoint, under the pairing ``<ct, t> = Re(sum(ct * t))``. For a holomorphic ``f`` that makes
``ct_x = ct * f'(x)`` with no conjugate, so the lines above hold for complex operands as
written; the gradient of a real loss ``L`` at ``z = x + iy`` is ``dL/dx - i dL/dy``. Only the
non-holomorphic primitives need their own complex rules: ``real``, ``imag``, ``conj``,
``complex``, ``abs`` and ``sign`` (section "complex numbers").
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from bpkit.engine import compat
from bpkit.engine.registry import register_vjp
from bpkit.rules.helpers import defbinary, defunary, is_complex, unbroadcast, zeros_like

P = lax  # the primitives live on jax.lax as `<name>_p`

# --- arithmetic -----------------------------------------------------------------------------
defbinary(P.add_p, lambda ct, x, y, z: ct, lambda ct, x, y, z: ct)
defbinary(P.sub_p, lambda ct, x, y, z: ct, lambda ct, x, y, z: -ct)
defbinary(P.mul_p, lambda ct, x, y, z: ct * y, lambda ct, x, y, z: ct * x)
defbinary(P.div_p, lambda ct, x, y, z: ct / y, lambda ct, x, y, z: -ct * x * lax.integer_pow(y, -2))
defunary(P.neg_p, lambda ct, x, z: -ct)
defbinary(P.rem_p, lambda ct, x, y, z: ct,
          lambda ct, x, y, z: -ct * jnp.sign(x / y) * jnp.floor(jnp.abs(x / y)))


def _balanced_eq(x, z, y):
    """1 where ``x`` is the max/min ``z`` alone, 1/2 where ``y`` ties with it, else 0 (JAX's rule)."""
    one, zero = jnp.ones_like(z), jnp.zeros_like(z)
    return lax.select(x == z, one, zero) / lax.select(y == z, one + one, one)


defbinary(P.max_p, lambda ct, x, y, z: ct * _balanced_eq(x, z, y),
          lambda ct, x, y, z: ct * _balanced_eq(y, z, x))
defbinary(P.min_p, lambda ct, x, y, z: ct * _balanced_eq(x, z, y),
          lambda ct, x, y, z: ct * _balanced_eq(y, z, x))


# --- powers and roots -----------------------------------------------------------------------
@register_vjp(P.pow_p)
def _pow_vjp(ct, x, y, *, out):
    """``d(x**y)/dx = y * x**(y-1)``, ``d(x**y)/dy = log(x) * x**y``, exactly as JAX writes them:

    * for a float ``y`` the first is ``y * x**(y-1)`` everywhere, so ``x = y = 0`` gives
      ``0 * inf = nan`` (JAX's value; ``jax.grad(lax.pow)(0., 0.)`` is nan);
    * for an integer ``y`` it is 0 where ``y == 0`` (``x**0`` is the constant 1), and the
      integer exponent gets no cotangent;
    * ``log(0)`` is replaced by ``log(1) = 0`` in the second.
    """
    x, y = compat.as_array(x), compat.as_array(y)  # either may be a literal
    y_f = lax.convert_element_type(y, out.dtype)
    if jnp.issubdtype(compat.typeof(y).dtype, jnp.integer):
        shape = jnp.broadcast_shapes(np.shape(x), np.shape(y))
        x_b, y_b = jnp.broadcast_to(x, shape), jnp.broadcast_to(y_f, shape)
        is_zero = y_b == 0
        y_nz = lax.select(is_zero, jnp.ones_like(y_b), y_b)
        jac = lax.select(is_zero, jnp.zeros_like(y_b), y_nz * lax.pow(x_b, y_b - 1))
        return [unbroadcast(ct * jac, x), None]
    ct_x = ct * (y_f * lax.pow(x, y_f - 1))
    safe_x = lax.select(x == 0, jnp.ones_like(x), x)
    ct_y = ct * (jnp.log(safe_x) * out)
    return [unbroadcast(ct_x, x), unbroadcast(ct_y, y)]


@register_vjp(P.integer_pow_p)
def _integer_pow_vjp(ct, x, *, out, y):
    """d(x**n)/dx = n * x**(n-1)."""
    if y == 0:
        return [zeros_like(x)]
    return [ct * (y * (lax.integer_pow(x, y - 1) if y != 1 else jnp.ones_like(x)))]


defunary(P.square_p, lambda ct, x, z: ct * 2 * x)
defunary(P.sqrt_p, lambda ct, x, z: ct * (0.5 / z))
defunary(P.rsqrt_p, lambda ct, x, z: ct * (-0.5 * z / x))
defunary(P.cbrt_p, lambda ct, x, z: ct * (lax.integer_pow(z, -2) / 3))

# --- exponentials and logarithms ------------------------------------------------------------
defunary(P.exp_p, lambda ct, x, z: ct * z)
defunary(P.exp2_p, lambda ct, x, z: ct * z * math.log(2))
defunary(P.log_p, lambda ct, x, z: ct / x)
defunary(P.log1p_p, lambda ct, x, z: ct / (x + 1))
defunary(P.expm1_p, lambda ct, x, z: ct * (z + 1))
defunary(P.tanh_p, lambda ct, x, z: (ct + ct * z) * (1 - z))  # (1 + z)(1 - z) = 1 - tanh^2
defunary(P.logistic_p, lambda ct, x, z: ct * z * (1 - z))
if hasattr(P, "log2_p"):  # JAX >= 0.11 has a log2 primitive
    defunary(P.log2_p, lambda ct, x, z: ct / (x * math.log(2)))

# --- error functions and special functions --------------------------------------------------
defunary(P.erf_p, lambda ct, x, z: ct * (2 / math.sqrt(math.pi)) * jnp.exp(-x * x))
defunary(P.erfc_p, lambda ct, x, z: ct * (-2 / math.sqrt(math.pi)) * jnp.exp(-x * x))
defunary(P.erf_inv_p, lambda ct, x, z: ct * (math.sqrt(math.pi) / 2) * jnp.exp(z * z))
defunary(P.lgamma_p, lambda ct, x, z: ct * lax.digamma(x))
defunary(P.digamma_p, lambda ct, x, z: ct * lax.polygamma(jnp.ones_like(x), x))

# --- trigonometric and hyperbolic -----------------------------------------------------------
defunary(P.sin_p, lambda ct, x, z: ct * jnp.cos(x))
defunary(P.cos_p, lambda ct, x, z: -ct * jnp.sin(x))
defunary(P.tan_p, lambda ct, x, z: ct * (1 + z * z))
defunary(P.asin_p, lambda ct, x, z: ct * lax.rsqrt(1 - x * x))
defunary(P.acos_p, lambda ct, x, z: -ct * lax.rsqrt(1 - x * x))
defunary(P.atan_p, lambda ct, x, z: ct / (1 + x * x))
defbinary(P.atan2_p, lambda ct, x, y, z: ct * (y / (x * x + y * y)),
          lambda ct, x, y, z: ct * (-x / (x * x + y * y)))
defunary(P.sinh_p, lambda ct, x, z: ct * jnp.cosh(x))
defunary(P.cosh_p, lambda ct, x, z: ct * jnp.sinh(x))
defunary(P.asinh_p, lambda ct, x, z: ct * lax.rsqrt(x * x + 1))
defunary(P.acosh_p, lambda ct, x, z: ct * lax.rsqrt((x - 1) * (x + 1)))
defunary(P.atanh_p, lambda ct, x, z: ct / (1 + x) / (1 - x))

# nextafter(x, y) moves x by one ulp towards y: slope 1 in x (JAX >= 0.12 agrees; 0.11.2 and
# earlier have no rule).
defbinary(P.nextafter_p, lambda ct, x, y, z: ct, lambda ct, x, y, z: jnp.zeros_like(ct))

# --- sign-dependent and complex numbers -----------------------------------------------------
def _abs_pullback(ct, x, z):
    """Real ``x``: ``ct * sign(x)``, with ``+ct`` at 0 as in JAX. Complex ``x``: ``|x|`` is not
    holomorphic; ``d|x| = Re(conj(x) dx) / |x|``, whose transpose is ``ct * conj(x) / |x|``
    (0 at ``x = 0``, where JAX divides by 1 instead of 0)."""
    if not is_complex(x):
        return lax.select(x >= 0, ct, -ct)
    safe = lax.convert_element_type(lax.select(z == 0, jnp.ones_like(z), z), x.dtype)
    return lax.convert_element_type(ct, x.dtype) * (lax.conj(x) / safe)


defunary(P.abs_p, _abs_pullback)


@register_vjp(P.sign_p)
def _sign_vjp(ct, x, *, out):
    """Zero for real ``x`` (piecewise constant). For complex ``x != 0``, ``s = sign(x) = x/|x| =
    e^{i theta}`` moves only with the angle: ``ds = i s Im(conj(s) dx) / |x|``; its transpose is
    ``ct_x = i conj(s) Im(ct s) / |x|`` (0 at ``x = 0``). JAX 0.10 takes the complex derivative
    to be zero too; later releases use the formula (``compat.COMPLEX_SIGN_IS_DIFFERENTIABLE``)."""
    if not (is_complex(x) and compat.COMPLEX_SIGN_IS_DIFFERENTIABLE):
        return [None]
    r = lax.abs(x)
    safe = lax.select(r == 0, jnp.ones_like(r), r)
    return [lax.complex(jnp.zeros_like(r), lax.imag(ct * out) / safe) * lax.conj(out)]


# real(x) and imag(x) are R-linear: Re(ct_x dx) = ct Re(dx) gives ct_x = ct, and
# Re(ct_x dx) = ct Im(dx) gives ct_x = -i ct.
defunary(P.real_p, lambda ct, x, z: lax.convert_element_type(ct, x.dtype))
defunary(P.imag_p, lambda ct, x, z: lax.complex(jnp.zeros_like(ct), -ct))
# complex(x, y) = x + iy: Re(ct (dx + i dy)) = Re(ct) dx - Im(ct) dy.
defbinary(P.complex_p, lambda ct, x, y, z: lax.real(ct), lambda ct, x, y, z: -lax.imag(ct))
# conj: Re(ct conj(dx)) = Re(conj(ct) dx). Of a real x it only changes the dtype: ct_x = Re(ct).
defunary(P.conj_p, lambda ct, x, z: lax.conj(ct) if is_complex(x) else lax.real(ct))


# --- selection ------------------------------------------------------------------------------
@register_vjp(P.select_n_p)
def _select_n_vjp(ct, which, *cases, out):
    """``out = cases[which]``: each case receives ``ct`` where it was selected, 0 elsewhere."""
    zero = jnp.zeros_like(ct)
    which = compat.as_array(which)  # a literal predicate (jnp.where(True, x, 0.)) is a bool
    which = jnp.broadcast_to(which, ct.shape) if which.shape != ct.shape else which
    cts = []
    for i, case in enumerate(cases):
        picks = [zero] * len(cases)
        picks[i] = ct
        cts.append(unbroadcast(lax.select_n(which, *picks), case))
    return [None, *cts]


@register_vjp(P.clamp_p)
def _clamp_vjp(ct, lo, x, hi, *, out):
    """``clamp(lo, x, hi)``: ``x`` gets ``ct`` strictly inside ``(lo, hi)``; a bound gets it where
    it is the active one (``lo > x`` for the lower, ``x > hi`` for the upper), as in JAX."""
    zero = jnp.zeros_like(ct)
    ct_lo = lax.select((lo > x) & (lo < hi), ct, zero)
    ct_x = lax.select((x > lo) & (x < hi), ct, zero)
    ct_hi = lax.select(hi < x, ct, zero)
    return [unbroadcast(ct_lo, lo), ct_x, unbroadcast(ct_hi, hi)]


if hasattr(P, "one_minus_square_p"):  # JAX >= 0.11: 1 - x**2 as one primitive
    defunary(P.one_minus_square_p, lambda ct, x, z: ct * (-2 * x))

# add_any: the sum JAX's own backward passes build (seen when bpkit differentiates a jax.grad)
defbinary(compat.internal_primitive("add_jaxvals_p"), lambda ct, x, y, z: ct,
          lambda ct, x, y, z: ct)

_polynomial_p = compat.internal_primitive("polynomial_p")
if _polynomial_p is not None:  # JAX >= 0.12: lax.polynomial (Horner's rule), used by erf
    @register_vjp(_polynomial_p)
    def _polynomial_vjp(ct, x, *coeffs, out, unroll=None):
        """``p(x) = sum_k a_k x**k``: ``dp/dx = sum_{k>=1} k a_k x**(k-1)`` (itself a polynomial),
        ``dp/da_k = x**k`` (broadcast operands sum their cotangent back)."""
        kw = {} if unroll is None else {"unroll": unroll}
        slope = [c * k for k, c in enumerate(coeffs[1:], 1)]
        ct_x = ct * lax.polynomial(x, slope, **kw) if slope else jnp.zeros_like(ct)
        cts, power = [], ct
        for k, c in enumerate(coeffs):
            cts.append(unbroadcast(power, c))
            if k + 1 < len(coeffs):
                power = power * x
        return [unbroadcast(ct_x, x), *cts]

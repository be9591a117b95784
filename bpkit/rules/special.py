"""VJP rules of special functions and of reparameterised gamma sampling.

``lgamma``, ``digamma``, ``erf`` and friends are in ``elementwise.py``; here are the functions
behind ``jax.scipy.special.gammainc/gammaincc/betainc/polygamma/i0e/i1e`` and
``jax.random.gamma/beta/dirichlet/loggamma``. Each derivative is JAX's, including where JAX
defines none:

* ``igamma(a, x) = P(a, x) = gamma(a, x) / Gamma(a)`` (regularised lower incomplete gamma):
  ``dP/dx = x^(a-1) e^(-x) / Gamma(a)``; ``dP/da`` has no closed form and is evaluated by
  ``lax.igamma_grad_a`` (series / continued fraction). ``igammac = 1 - P``: both negated.
* ``igamma_grad_a`` itself and ``zeta`` (Hurwitz zeta) have no derivative in JAX: refused.
  (``jax.scipy.special.zeta`` is a ``custom_jvp`` with JAX's own rule in ``s`` and ``q``; bpkit
  follows it like any custom JVP.)
* ``polygamma(m, x) = psi^(m)(x)``: ``d/dx = psi^(m+1)(x)``; differentiating the order ``m``
  raises ``ValueError``, as in JAX.
* ``regularized_incomplete_beta(a, b, x) = I_x(a, b)``: ``d/dx = x^(a-1) (1-x)^(b-1) / B(a, b)``;
  differentiating ``a`` or ``b`` raises ``ValueError``, as in JAX.
* ``bessel_i0e(x) = e^(-|x|) I_0(x)``: with ``I_0' = I_1``, ``d/dx = i1e(x) - sign(x) i0e(x)``.
* ``bessel_i1e(x) = e^(-|x|) I_1(x)``: with ``I_1'(x) = I_0(x) - I_1(x) / x``,
  ``d/dx = i0e(x) - i1e(x) (sign(x) + 1/x)``, and its limit ``1/2`` where ``|x| <= eps``.
* ``random_gamma(key, a)``: a sample ``s ~ Gamma(a, 1)`` is a deterministic function of ``a`` for
  a fixed key. Holding its uniform ``u = F(s; a)`` fixed (implicit reparameterisation) gives
  ``ds/da = -(dF/da) / (dF/ds)``, which ``lax.random_gamma_grad(a, s)`` evaluates; JAX's
  derivative is exactly this. With ``log_space`` (``jax.random.beta``/``dirichlet``/
  ``loggamma``) the output is ``log s`` and ``d log(s)/da = (ds/da) / s``, with ``s = exp(out)``
  raised to the smallest normal number where it underflows to 0 (as JAX). ``random_gamma_grad``
  is not a primitive: it is traced into ordinary operations (with ``while`` loops, so neither
  JAX nor bpkit takes second derivatives of a gamma sample).
"""
from __future__ import annotations

import jax.extend.core.primitives as prims
import jax.numpy as jnp
from jax import lax

from bpkit.engine.registry import register_refused, register_vjp
from bpkit.rules.helpers import defbinary, defunary, defvjp_refusing, unbroadcast


# --- incomplete gamma -------------------------------------------------------------------------
def _igamma_dx(ct, a, x, out):
    return ct * jnp.exp(-x + (a - 1) * jnp.log(x) - lax.lgamma(a))


defbinary(prims.igamma_p, lambda ct, a, x, out: ct * lax.igamma_grad_a(a, x), _igamma_dx)
defbinary(prims.igammac_p, lambda ct, a, x, out: -ct * lax.igamma_grad_a(a, x),
          lambda ct, a, x, out: -_igamma_dx(ct, a, x, out))
register_refused(
    prims.igamma_grad_a_p,
    "JAX defines no derivative of igamma_grad_a (the derivative of igamma/gammainc with "
    "respect to a), so second derivatives of gammainc with respect to a are unavailable in "
    "both. Stop the gradient through a (jax.lax.stop_gradient) in the inner derivative.")
register_refused(
    prims.zeta_p,
    "JAX defines no derivative of the zeta primitive (jax.lax.zeta) either. Use "
    "jax.scipy.special.zeta, whose custom derivative with respect to q bpkit follows, or wrap "
    "the call in jax.lax.stop_gradient.")


# --- polygamma and the incomplete beta function -----------------------------------------------
defvjp_refusing(
    prims.polygamma_p,
    lambda ct, m, x, *, out: [None, unbroadcast(ct * lax.polygamma(m + 1, x), x)],
    {0: "polygamma(m, x) cannot be differentiated with respect to its order m (JAX does not "
        "define that derivative either). Pass m as a constant or through "
        "jax.lax.stop_gradient."})


def _betainc_vjp(ct, a, b, x, *, out):
    """``d I_x(a, b) / dx = exp((b-1) log(1-x) + (a-1) log(x) - log B(a, b))``."""
    log_beta = lax.lgamma(a) + lax.lgamma(b) - lax.lgamma(a + b)
    return [None, None, unbroadcast(
        ct * jnp.exp((b - 1) * jnp.log1p(-x) + (a - 1) * jnp.log(x) - log_beta), x)]


defvjp_refusing(
    prims.regularized_incomplete_beta_p, _betainc_vjp,
    {i: "regularized_incomplete_beta(a, b, x) (jax.scipy.special.betainc) can be "
        "differentiated with respect to x only (JAX does not define the derivatives with "
        "respect to a and b either). Pass a and b as constants or through "
        "jax.lax.stop_gradient." for i in (0, 1)})


# --- exponentially scaled modified Bessel functions ---------------------------------------------
defunary(prims.bessel_i0e_p, lambda ct, x, y: ct * (lax.bessel_i1e(x) - jnp.sign(x) * y))


def _bessel_i1e_pullback(ct, x, y):
    eps = jnp.finfo(x.dtype).eps
    not_tiny = jnp.abs(x) > eps
    safe_x = lax.select(not_tiny, x, jnp.full_like(x, eps))
    slope = lax.bessel_i0e(safe_x) - y * (jnp.sign(safe_x) + 1 / safe_x)
    return ct * lax.select(not_tiny, slope, jnp.full_like(x, 0.5))


defunary(prims.bessel_i1e_p, _bessel_i1e_pullback)


# --- reparameterised gamma samples --------------------------------------------------------------
@register_vjp(prims.random_gamma_p)
def _random_gamma_vjp(ct, key, a, *, out, log_space):
    if log_space:
        sample = jnp.exp(out)
        sample = lax.select(sample == 0, jnp.full_like(sample, jnp.finfo(sample.dtype).tiny),
                            sample)
        slope = lax.random_gamma_grad(a, sample) / sample
    else:
        slope = lax.random_gamma_grad(a, out)
    return [None, ct * slope]

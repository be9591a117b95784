"""Parity table for bpkit/rules/special.py, row for row: the incomplete gamma functions (in x
and in a), polygamma, the incomplete beta function (in x), the scaled Bessel functions and
reparameterised gamma samples (``jax.random.gamma/beta/dirichlet/loggamma``, differentiated
with respect to the shape parameters). Where JAX refuses a derivative, bpkit must refuse it
too (``test_refused_like_jax``)."""
import jax
import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.scipy import special as sp

import bpkit
from bpkit.engine import registry
from tests.rules.harness import Case, args, assert_case_parity, const, parametrize, uniform

S = (3, 4)
shape = dict(lo=0.6, hi=3.0)  # gamma shape parameters
KEY, KEY2 = jax.random.key(7), jax.random.key(8)
ADD_ANY = prims.add_jaxvals_p
# igamma's derivative in a compiles a large series/continued-fraction program: by default only
# the float64 check with finite differences runs.
HEAVY = ("float32-jit", "float64-jit")

CASES = [
    # incomplete gamma: d/da by igamma_grad_a, d/dx in closed form
    Case("igamma", lambda a, x: lax.igamma(a, x),
         args(uniform(*S, **shape), uniform(*S, lo=0.2, hi=4.0)), argnums=(0, 1), slow_modes=HEAVY),
    Case("igamma_large_x_continued_fraction", sp.gammainc,
         args(uniform(4, lo=0.5, hi=2.0), uniform(4, lo=3.0, hi=8.0)), argnums=(0, 1),
         marks=(pytest.mark.slow,)),
    Case("igammac", lambda a, x: sp.gammaincc(a, x),
         args(uniform(*S, **shape), uniform(*S, lo=0.2, hi=4.0)), argnums=(0, 1),
         marks=(pytest.mark.slow,)),
    # zeta: lax.zeta is refused as in JAX; jax.scipy.special.zeta's custom JVP (in s and q)
    # is followed (its rule emits add_any, whose rule lives in another family)
    Case("zeta_through_scipy_custom_jvp", lambda s, q: sp.zeta(s, q),
         args(uniform(*S, lo=2.0, hi=4.0), uniform(*S, lo=0.5, hi=3.0)), argnums=(0, 1),
         marks=(pytest.mark.skipif(not registry.has_rule(ADD_ANY), reason="no add_any rule yet"),)),
    # polygamma in x (its order m is a constant)
    Case("polygamma", lambda x: sp.polygamma(2, x) + lax.polygamma(jnp.ones_like(x), x),
         args(uniform(*S, lo=0.5, hi=3.0))),
    Case("betainc_in_x", lambda a, b, x: sp.betainc(a, b, x),
         args(uniform(*S, lo=0.5, hi=3.0), uniform(*S, lo=0.5, hi=3.0),
              uniform(*S, lo=0.05, hi=0.95)), argnums=(2,)),
    Case("bessel_i0e", sp.i0e, args(uniform(*S, lo=-4.0, hi=4.0))),
    Case("bessel_i0_through_i0e", sp.i0, args(uniform(*S, lo=-3.0, hi=3.0)),
         marks=(pytest.mark.slow,)),
    Case("bessel_i1e", sp.i1e, args(uniform(*S, lo=-4.0, hi=4.0))),
    Case("bessel_i1e_at_zero", sp.i1e, args(const(jnp.array([-1.0, 0.0, 1e-30, 2.0]))), fd=False),
    # reparameterised gamma samples, differentiated with respect to the shape parameters (the
    # implicit derivative is not the sampler's pathwise one: no finite differences)
    # (sampling compiles a rejection loop: by default one jitted float64 run covers both forms)
    Case("random_gamma_and_loggamma",
         lambda a: (jax.random.gamma(KEY, a, dtype=a.dtype),
                    jax.random.loggamma(KEY2, a, dtype=a.dtype)),
         args(uniform(*S, lo=0.1, hi=3.0)), fd=False, slow_modes=("float32-jit", "float64-eager")),
    Case("random_gamma_small_shape", lambda a: jax.random.gamma(KEY, a, (2, 3), a.dtype),
         args(uniform(3, lo=0.05, hi=0.3)), fd=False, marks=(pytest.mark.slow,)),
    Case("random_beta", lambda a, b: jax.random.beta(KEY, a, b, dtype=a.dtype),
         args(uniform(*S, **shape), uniform(*S, **shape)), argnums=(0, 1), fd=False,
         marks=(pytest.mark.slow,)),
    Case("random_dirichlet", lambda alpha: jax.random.dirichlet(KEY, alpha, (2,), alpha.dtype),
         args(uniform(5, **shape)), fd=False, marks=(pytest.mark.slow,)),
]


@parametrize(CASES)
def test_special(case, dtype, jit):
    assert_case_parity(case, dtype, jit)


REFUSED = {
    # where JAX raises; `grad` is jax.grad or bpkit.grad (traced under jit: nothing compiles)
    "betainc_in_a": lambda grad: grad(lambda a: jnp.sum(sp.betainc(a, 2.0, 0.3))),
    "polygamma_in_m": lambda grad: grad(lambda m: jnp.sum(lax.polygamma(m, 1.5))),
    "lax_zeta": lambda grad: grad(lambda q: jnp.sum(lax.zeta(3.0, q))),
    "igamma_second_derivative_in_a": lambda grad: grad(
        lambda a: jnp.sum(grad(lambda b: jnp.sum(lax.igamma(b, 1.5)))(a))),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_like_jax(name):
    x = jnp.array([1.5, 2.5])
    with pytest.raises((ValueError, NotImplementedError)):
        jax.jit(REFUSED[name](jax.grad))(x)
    with pytest.raises((ValueError, bpkit.UnsupportedPrimitiveError), match="JAX"):
        jax.jit(REFUSED[name](bpkit.grad))(x)


@pytest.mark.slow
def test_gamma_sample_slope_is_the_implicit_reparameterisation():
    """d sample / d a == -(dF/da) / (dF/ds) with F the gamma CDF (igamma), by finite differences
    of F in a: the reparameterised sample keeps its CDF value fixed."""
    a = jnp.array([0.7, 1.5, 4.0])
    s = jax.random.gamma(KEY, a)
    eps = 1e-6
    dF_da = (lax.igamma(a + eps, s) - lax.igamma(a - eps, s)) / (2 * eps)
    dF_ds = jnp.exp(-s + (a - 1) * jnp.log(s) - lax.lgamma(a))
    got = bpkit.grad(lambda a: jnp.sum(jax.random.gamma(KEY, a)))(a)
    np.testing.assert_allclose(got, -dF_da / dF_ds, rtol=1e-6)

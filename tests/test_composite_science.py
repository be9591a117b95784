"""Scientific-computing programs in plain JAX: an FFT spectral convolution layer (a Fourier neural
operator block, 1-D and 2-D), a power-spectrum loss, attention with complex rotary embeddings,
and variational objectives with reparameterised gamma, beta and Dirichlet samples. bpkit's
gradient equals jax.grad's jitted (with float64 finite differences where the derivative is the
function's own) and eagerly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.scipy import special as sp

import bpkit

RNG = np.random.default_rng(2024)  # NumPy draws: collecting this module compiles nothing


def normal(shape, scale=0.5):
    return jnp.asarray(RNG.standard_normal(shape) * scale)


# --- Fourier neural operator ------------------------------------------------------------------
def spectral_conv_1d(w_re, w_im, h):
    """``h (B, N, C) -> (B, N, C')``: keep the lowest ``modes`` frequencies, mix channels with
    complex weights ``(modes, C, C')``, transform back."""
    n, modes = h.shape[1], w_re.shape[0]
    h_ft = jnp.fft.rfft(h, axis=1)[:, :modes]
    out_ft = jnp.einsum("bmi,mio->bmo", h_ft, lax.complex(w_re, w_im))
    out_ft = jnp.pad(out_ft, ((0, 0), (0, n // 2 + 1 - modes), (0, 0)))
    return jnp.fft.irfft(out_ft, n=n, axis=1)


def fno_1d(p, x, y):
    """Lift, two Fourier layers (spectral conv + pointwise linear, GELU), project; MSE."""
    h = x @ p["lift"]
    for layer in ("l1", "l2"):
        q = p[layer]
        h = jax.nn.gelu(spectral_conv_1d(q["w_re"], q["w_im"], h) + h @ q["pointwise"]
                        + q["b"][None, None, :])
    return jnp.mean((h @ p["proj"] - y) ** 2)


def _fourier_layer(c, modes):
    return {"w_re": normal((modes, c, c), 0.3), "w_im": normal((modes, c, c), 0.3),
            "pointwise": normal((c, c)), "b": normal((c,), 0.1)}


FNO_ARGS = ({"lift": normal((2, 4)), "l1": _fourier_layer(4, 3), "l2": _fourier_layer(4, 3),
             "proj": normal((4, 1))}, normal((2, 12, 2), 1.0), normal((2, 12, 1), 1.0))


def spectral_conv_2d(p, x):
    """``x (B, H, W, C)``: 2-D rfft, complex channel mixing on the low-frequency corner, irfft2."""
    b, hh, ww, c = x.shape
    m1, m2 = p["w_re"].shape[:2]
    x_ft = jnp.fft.rfft2(x, axes=(1, 2))[:, :m1, :m2]
    out_ft = jnp.einsum("bxyi,xyio->bxyo", x_ft, lax.complex(p["w_re"], p["w_im"]))
    out_ft = jnp.pad(out_ft, ((0, 0), (0, hh - m1), (0, ww // 2 + 1 - m2), (0, 0)))
    out = jnp.fft.irfft2(out_ft, s=(hh, ww), axes=(1, 2))
    return jnp.sum(jnp.tanh(out + x) ** 2)


SPEC2D_ARGS = ({"w_re": normal((3, 2, 2, 2)), "w_im": normal((3, 2, 2, 2))},
               normal((2, 6, 5, 2), 1.0))


# --- power-spectrum loss ------------------------------------------------------------------------
def power_spectrum_loss(w, x, target_log_power):
    """Match the log power spectrum ``log |rfft(y)|^2`` of a generated signal to a target."""
    y = jnp.tanh(x @ w)  # (B, N)
    power = jnp.abs(jnp.fft.rfft(y, axis=-1)) ** 2 / y.shape[-1]
    full = jnp.abs(jnp.fft.fft(y, axis=-1, norm="ortho")) ** 2  # two-sided, orthonormal
    return (jnp.mean((jnp.log(power + 1e-3) - target_log_power) ** 2)
            + 0.1 * jnp.mean(full))


PS_ARGS = (normal((5, 16)), normal((3, 5), 1.0), normal((3, 9), 1.0))


# --- complex rotary position embeddings (RoPE) --------------------------------------------------
def rotary(u, angles):
    """Rotate consecutive pairs of ``u (B, T, D)`` as complex numbers by ``exp(i angles)``."""
    pairs = lax.complex(u[..., 0::2], u[..., 1::2])  # (B, T, D/2)
    rotated = pairs * jnp.exp(lax.complex(jnp.zeros_like(angles), angles))[None]
    re, im = jnp.real(rotated)[..., None], jnp.imag(rotated)[..., None]
    return jnp.concatenate([re, im], -1).reshape(u.shape)


def rope_attention(p, x):
    """Causal single-head attention with learnable RoPE frequencies; a real loss."""
    b, t, d = x.shape
    angles = jnp.arange(t, dtype=x.dtype)[:, None] * p["freq"][None, :]  # (T, D/2)
    q, k = rotary(x @ p["wq"], angles), rotary(x @ p["wk"], angles)
    scores = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(d)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None], scores, -1e9)
    out = jax.nn.softmax(scores, -1) @ (x @ p["wv"])
    return jnp.mean(out ** 2)


ROPE_ARGS = ({"wq": normal((6, 8)), "wk": normal((6, 8)), "wv": normal((6, 8)),
              "freq": jnp.asarray(1.0 / 10.0 ** np.linspace(0.0, 1.0, 4))}, normal((2, 5, 6), 1.0))


# --- reparameterised gamma, beta and Dirichlet samples ------------------------------------------
def gamma_poisson_elbo(log_alpha, log_beta, counts, key):
    """Variational Gamma(alpha, beta) posterior over Poisson rates (prior Gamma(2, 1)):
    a 4-sample ELBO estimate with reparameterised samples."""
    alpha, beta = jnp.exp(log_alpha), jnp.exp(log_beta)
    z = jax.random.gamma(key, alpha, (4,) + alpha.shape) / beta[None]  # (S, K)
    log_lik = jnp.sum(counts[None] * jnp.log(z) - z - sp.gammaln(counts + 1.0)[None], -1)
    log_prior = jnp.sum(jnp.log(z) - z, -1)  # Gamma(2, 1), up to a constant
    log_q = jnp.sum(jax.scipy.stats.gamma.logpdf(z, alpha[None], scale=1.0 / beta[None]), -1)
    return -jnp.mean(log_lik + log_prior - log_q)


GAMMA_ARGS = (normal((3,)), normal((3,), 0.2), jnp.array([0.0, 3.0, 7.0]), jax.random.key(11))


def beta_bernoulli_elbo(log_a, log_b, flips, key):
    """Beta(a, b) posterior over coin biases from observed flips, prior Beta(1, 1)."""
    a, b = jnp.exp(log_a), jnp.exp(log_b)
    theta = jax.random.beta(key, a, b, (3,) + a.shape)  # (S, K)
    heads, n = jnp.sum(flips, -1), flips.shape[-1]
    log_lik = jnp.sum(heads[None] * jnp.log(theta) + (n - heads)[None] * jnp.log1p(-theta), -1)
    log_q = jnp.sum(jax.scipy.stats.beta.logpdf(theta, a[None], b[None]), -1)
    return -jnp.mean(log_lik - log_q)


BETA_ARGS = (normal((2,), 0.3) + 1.0, normal((2,), 0.3) + 1.0,
             jnp.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]), jax.random.key(12))


def dirichlet_topic_loss(log_alpha, counts, key):
    """A Dirichlet posterior over category probabilities: expected multinomial log-likelihood
    minus the log density of the (reparameterised) samples."""
    alpha = jnp.exp(log_alpha)
    pi = jax.random.dirichlet(key, alpha, (3,))  # (S, K)
    log_lik = jnp.sum(counts[None] * jnp.log(pi), -1)
    log_q = jax.vmap(lambda p: jax.scipy.stats.dirichlet.logpdf(p, alpha))(pi)
    return -jnp.mean(log_lik - log_q)


DIRICHLET_ARGS = (normal((4,), 0.3), jnp.array([3.0, 0.0, 1.0, 5.0]), jax.random.key(13))

SLOW = (pytest.mark.slow,)  # sampling compiles rejection loops (seconds each)
PROGRAMS = {
    # name: (function, args, argnums, finite differences?, marks)
    "fno_1d": (fno_1d, FNO_ARGS, 0, True, ()),
    "spectral_conv_2d": (spectral_conv_2d, SPEC2D_ARGS, (0, 1), True, ()),
    "power_spectrum_loss": (power_spectrum_loss, PS_ARGS, 0, True, ()),
    "rope_attention": (rope_attention, ROPE_ARGS, (0, 1), True, ()),
    # the implicit reparameterisation derivative is not the sampler's pathwise one: no FD
    "gamma_poisson_elbo": (gamma_poisson_elbo, GAMMA_ARGS, (0, 1), False, SLOW),
    "beta_bernoulli_elbo": (beta_bernoulli_elbo, BETA_ARGS, (0, 1), False, SLOW),
    "dirichlet_topic_loss": (dirichlet_topic_loss, DIRICHLET_ARGS, 0, False, SLOW),
}


def _params(marks_by_name):
    return [pytest.param(n, marks=list(PROGRAMS[n][4])) for n in marks_by_name]


@pytest.mark.parametrize("name", _params(PROGRAMS))
def test_parity_jitted(name):
    f, args, argnums, fd, _ = PROGRAMS[name]
    report = bpkit.check_parity(jax.jit(f), *args, argnums=argnums, fd=fd)
    assert report.ok, str(report)


@pytest.mark.slow  # op-by-op dispatch compiles every operation separately: seconds per program
@pytest.mark.parametrize("name", _params(PROGRAMS))
def test_eager_equals_jax_grad(name):
    f, args, argnums, _, _ = PROGRAMS[name]
    got = bpkit.grad(f, argnums)(*args)
    want = jax.grad(f, argnums)(*args)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_complex_parameters_get_jax_conjugate_convention():
    """A real loss of complex parameters: bpkit's gradient is JAX's ``dL/dx - i dL/dy`` (so a
    gradient step ``z - lr * conj(g)`` descends), here for complex spectral weights."""
    x = normal((2, 8), 1.0)
    w = lax.complex(normal((5,)), normal((5,)))

    def loss(w):
        return jnp.sum(jnp.fft.irfft(jnp.fft.rfft(x) * w[None], n=8) ** 2)

    g = jax.jit(bpkit.grad(loss))(w)
    np.testing.assert_allclose(g, jax.jit(jax.grad(loss))(w), rtol=1e-10)
    loss, eps = jax.jit(loss), 1e-6
    for k in range(5):
        e = jnp.zeros(5, w.dtype).at[k].set(eps)
        d_re = (loss(w + e) - loss(w - e)) / (2 * eps)
        d_im = (loss(w + 1j * e) - loss(w - 1j * e)) / (2 * eps)
        np.testing.assert_allclose(complex(g[k]), complex(d_re, -d_im), rtol=1e-6, atol=1e-9)


def test_second_order_through_fft_and_complex_rules():
    """The new rules are written with differentiable operations: the gradient of a gradient norm
    (through rfft/irfft/fft, complex, abs, conj, real, imag) equals JAX's."""
    x = normal((2, 8), 1.0)

    def loss(w_re, w_im):
        w = lax.complex(w_re, w_im)
        y = jnp.fft.irfft(jnp.fft.rfft(x) * w[None], n=8)
        z = jnp.fft.fft(jnp.sin(y))
        return jnp.sum(jnp.abs(z) + jnp.real(z * jnp.conj(z)) * 0.1 + jnp.imag(z) ** 2)

    def grad_norm(grad):
        return lambda w_re, w_im: sum(jnp.sum(g ** 2) for g in grad(loss, (0, 1))(w_re, w_im))

    args = (normal((5,)), normal((5,)))
    got = jax.jit(bpkit.grad(grad_norm(bpkit.grad), (0, 1)))(*args)
    want = jax.jit(jax.grad(grad_norm(jax.grad), (0, 1)))(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

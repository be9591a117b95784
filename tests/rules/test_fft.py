"""Parity table for bpkit/rules/fft.py (the ``fft`` primitive), row for row: FFT, IFFT, RFFT and
IRFFT over 1, 2 and 3 axes, odd and even lengths (the Hermitian weights of IRFFT's transpose
differ), through ``jnp.fft`` and ``lax.fft``, from real and from complex arguments."""
import jax.numpy as jnp
from jax import lax

from tests.rules.harness import (COMPLEX, Case, args, assert_case_parity, parametrize, real_arg,
                                 uniform)


def real_in(name, fun, *shape, **kw):
    """Row on a real signal (float rows; complex outputs get complex cotangents)."""
    return Case(name, fun, args(uniform(*shape)), **kw)


def complex_in(name, fun, *shape, **kw):
    """Row on a complex signal (complex rows)."""
    return Case(name, fun, args(uniform(*shape)), dtypes=COMPLEX, **kw)


CASES = [
    # FFT: ct_x = fft(ct)
    real_in("fft_1d_of_real", jnp.fft.fft, 3, 6),
    complex_in("fft_1d", lambda x: lax.fft(x, lax.FftType.FFT, (5,)), 2, 5),
    complex_in("fft_2d", jnp.fft.fft2, 2, 3, 4),
    complex_in("fft_3d_axes_moved", lambda x: jnp.fft.fftn(x, axes=(0, 2, 1)), 2, 3, 4),
    real_in("fft_padded_ortho", lambda x: jnp.fft.fft(x, n=8, norm="ortho"), 2, 5),
    # IFFT: ct_x = ifft(ct)
    complex_in("ifft_1d", jnp.fft.ifft, 3, 6),
    complex_in("ifft_3d", lambda x: jnp.fft.ifftn(x, axes=(0, 1, 2)), 2, 3, 5),
    # RFFT: ct_x = Re(fft(pad(ct)))
    real_in("rfft_1d_even", jnp.fft.rfft, 3, 8),
    real_in("rfft_1d_odd", jnp.fft.rfft, 3, 7),
    real_in("rfft_2d", jnp.fft.rfft2, 2, 4, 5),
    real_in("rfft_3d", lambda x: jnp.fft.rfftn(x, axes=(0, 1, 2)), 3, 4, 6),
    # IRFFT: ct_X = c * conj(rfft(ct)) / N with the Hermitian weights c
    complex_in("irfft_1d_even", jnp.fft.irfft, 3, 5),  # n = 8
    complex_in("irfft_1d_odd", lambda x: jnp.fft.irfft(x, n=9), 3, 5),
    complex_in("irfft_length_2", lambda x: jnp.fft.irfft(x, n=2), 3, 2),  # all self-mirrored
    complex_in("irfft_2d", jnp.fft.irfft2, 2, 4, 4),
    complex_in("irfft_3d_odd", lambda x: jnp.fft.irfftn(x, s=(2, 3, 5), axes=(0, 1, 2)), 2, 3, 3),
    real_in("rfft_then_irfft_of_real", lambda x: jnp.fft.irfft(jnp.fft.rfft(x) ** 2, n=7), 2, 7),
    Case("spectral_filter_real_gain",
         lambda x, g: jnp.fft.irfft(jnp.fft.rfft(x) * lax.complex(g, jnp.zeros_like(g))[None], n=6),
         args(real_arg(uniform(2, 6)), real_arg(uniform(4))), argnums=(0, 1), dtypes=COMPLEX),
]


@parametrize(CASES)
def test_fft(case, dtype, jit):
    assert_case_parity(case, dtype, jit)

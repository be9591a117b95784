"""The VJP rule of ``fft``: FFT, IFFT, RFFT and IRFFT over the last 1-3 axes (``jnp.fft.*``).

``fft_lengths = (n_1, ..., n_d)`` are the transformed (last ``d``) axes, ``N = n_1 ... n_d`` and
``n = n_d``; ``F`` is the unnormalised DFT over them, ``F[k, t] = exp(-2 pi i k.t / n)``, a
symmetric matrix. JAX's VJP is the transpose under the bilinear pairing
``<ct, t> = Re(sum(ct * t))`` (not the adjoint), so:

* **FFT** ``y = F x``: ``ct_x = F^T ct = F ct``, the FFT of the cotangent.
* **IFFT** ``y = F^{-1} x = conj(F) x / N``, also symmetric: ``ct_x = ifft(ct)``.
* **RFFT** ``y = S F E x``: ``E`` embeds the real ``x`` in the complex plane, ``S`` keeps the
  first ``m = n//2 + 1`` frequencies of the last axis. ``S^T`` pads with zeros, ``F^T = F`` and
  ``E^T`` takes the real part: ``ct_x = Re(fft(pad(ct)))``.
* **IRFFT** maps the half spectrum ``X`` (last axis of length ``m``) to the real signal whose
  spectrum is ``X`` completed by Hermitian symmetry, ``X_{-k} = conj(X_k)``. Each frequency of
  the last axis other than 0 and ``n/2`` stands for itself and its mirror image, whose terms
  are complex conjugates, so (with the imaginary parts of the self-mirrored ones dropped)

      x_t = (1/N) sum_{k_d < m} c_k Re(X_k exp(2 pi i k.t / n)),  c_k = 1 if k_d = 0 or
      k_d = n/2 (n even), else c_k = 2.

  Then ``sum_t ct_t x_t = Re(sum_k X_k (c_k / N) sum_t ct_t exp(2 pi i k.t / n))`` and, ``ct``
  being real, ``sum_t ct_t exp(+2 pi i k.t / n) = conj(rfft(ct)_k)``. Hence the Hermitian
  weighting ``ct_X = c * conj(rfft(ct)) / N`` (the weights double the de-duplicated
  frequencies; the imaginary parts of ``X`` at ``k_d = 0`` and ``n/2`` receive nothing, as
  they change nothing).
"""
from __future__ import annotations

import numpy as np
from jax import lax

from bpkit.engine.registry import register_vjp

FFT, IFFT, RFFT, IRFFT = (lax.FftType.FFT, lax.FftType.IFFT, lax.FftType.RFFT,
                          lax.FftType.IRFFT)


@register_vjp(lax.fft_p)
def _fft_vjp(ct, x, *, out, fft_type, fft_lengths):
    fft_lengths = tuple(fft_lengths)
    if fft_type == RFFT:
        n, m = fft_lengths[-1], ct.shape[-1]
        padding = [(0, 0, 0)] * (ct.ndim - 1) + [(0, n - m, 0)]
        padded = lax.pad(ct, lax.full((), 0, ct.dtype), padding)
        return [lax.real(lax.fft(padded, FFT, fft_lengths)).astype(x.dtype)]
    if fft_type == IRFFT:
        n = fft_lengths[-1]
        spectrum = lax.fft(ct, RFFT, fft_lengths)
        weights = np.full(spectrum.shape[-1], 2.0)
        weights[0] = 1.0
        if n % 2 == 0:
            weights[-1] = 1.0  # the Nyquist frequency n/2 is its own mirror image
        scale = lax.convert_element_type(weights / np.prod(fft_lengths), spectrum.dtype)
        scale = lax.broadcast_in_dim(scale, spectrum.shape, (spectrum.ndim - 1,))
        return [lax.conj(spectrum * scale).astype(x.dtype)]
    return [lax.fft(ct, fft_type, fft_lengths)]  # FFT and IFFT are symmetric

"""bpkit's hand-written VJP rules, one module per primitive family.

Importing this package registers every rule. To find the rule of a primitive, open the module
of its family:

=================  ==========================================================================
module             primitives
=================  ==========================================================================
elementwise        add mul div max pow exp log tanh sin ... select_n clamp, complex numbers:
                   real imag complex conj abs sign
structural         broadcast_in_dim reshape transpose squeeze rev concatenate pad
                   convert_element_type copy reduce_precision split expand_dims
slicing            slice dynamic_slice dynamic_update_slice gather scatter scatter-add/sub/
                   mul/max/min sort top_k
reductions         reduce_sum/max/min/prod, argmax, cumsum/prod/max/min, cumlogsumexp
linalg             dot_general
linalg_decomp      cholesky triangular_solve lu qr householder_product eigh svd
                   custom_linear_solve (lu_pivots_to_permutation: nondiff)
conv               conv_general_dilated
fft                fft (FFT, IFFT, RFFT, IRFFT over 1-3 axes)
windows            reduce_window_sum / reduce_window_max (pooling)
special            igamma igammac polygamma betainc bessel_i0e/i1e random_gamma (zeta refused)
control            jit, closed_call, remat, custom_jvp_call, custom_vjp_call, scan, cond
collectives        shard_map (and so pmap), psum, psum_invariant, pvary, all_gather,
                   reduce_scatter, ppermute, all_to_all, pbroadcast, axis_index; pmax/pmin refused
loops              while (checkpointed reverse mode, no trip-count bound)
nondiff            comparisons, floor/ceil/round, iota, random bits, stop_gradient
refusals           the deliberate refusals (while, custom reduce_window, callbacks, refs, ...)
=================  ==========================================================================
"""
from bpkit.rules import (  # noqa: F401  (imported for their registrations)
    collectives,
    control,
    conv,
    elementwise,
    fft,
    linalg,
    linalg_decomp,
    loops,
    nondiff,
    reductions,
    refusals,
    slicing,
    special,
    structural,
    windows,
)

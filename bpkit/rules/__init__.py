"""bpkit's hand-written VJP rules, one module per primitive family.

Importing this package registers every rule. To find the rule of a primitive, open the module
of its family:

=================  ==========================================================================
module             primitives
=================  ==========================================================================
elementwise        add mul div max pow exp log tanh sin ... select_n clamp
structural         broadcast_in_dim reshape transpose squeeze rev concatenate pad
                   convert_element_type copy reduce_precision split expand_dims
slicing            slice dynamic_slice dynamic_update_slice gather scatter scatter-add/sub/
                   mul/max/min sort top_k
reductions         reduce_sum/max/min/prod, argmax, cumsum/prod/max/min, cumlogsumexp
linalg             dot_general
conv               conv_general_dilated
windows            reduce_window_sum / reduce_window_max (pooling)
control            jit, closed_call, remat, custom_jvp_call, custom_vjp_call, scan, cond
nondiff            comparisons, floor/sign/round, iota, random bits, stop_gradient
refusals           the deliberate refusals (while, custom reduce_window, callbacks, refs, ...)
=================  ==========================================================================
"""
from bpkit.rules import (  # noqa: F401  (imported for their registrations)
    control,
    conv,
    elementwise,
    linalg,
    nondiff,
    reductions,
    refusals,
    slicing,
    structural,
    windows,
)

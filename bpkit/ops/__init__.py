"""Fused ops with hand-derived backward passes (``jax.custom_vjp``).

Each op's module holds its ``*_forward`` (which names what it saves) beside its ``*_backward``
(the derivation is in the module docstring), as llm.c pairs ``layernorm_forward`` with
``layernorm_backward``. ``bpkit.ops.reference`` holds the unfused compositions they are proven
against; bpkit's engine and ``jax.grad`` both run the hand-written backward.

===========================  ===============================  ============================
op                           saves                            instead of
===========================  ===============================  ============================
softmax_cross_entropy        logits, labels, lse (per row)    log-softmax (..., C)
layer_norm                   x, scale, mean, rstd (per row)   xhat, centred x, ...
attention                    q, k, v, out, lse (per row)      probabilities (B, H, Tq, Tk)
conv (few taps)              x, w                             x, w (its gain: the forward)
===========================  ===============================  ============================
"""
from bpkit.ops import reference
from bpkit.ops.attention import attention
from bpkit.ops.conv import conv
from bpkit.ops.cross_entropy import softmax_cross_entropy
from bpkit.ops.layer_norm import layer_norm

__all__ = ["attention", "conv", "layer_norm", "softmax_cross_entropy", "reference"]

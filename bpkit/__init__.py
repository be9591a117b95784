"""bpkit: backpropagation you can read.

A model is a pure JAX function of ``(params, batch)``; bpkit differentiates it with its own
reverse-mode engine and hand-written VJP rules (``bpkit/rules/``), proven equal to ``jax.grad``
and to float64 finite differences.
"""
from bpkit import rules as _rules  # noqa: F401  (registers every rule)
from bpkit import testing
from bpkit.check import ParityReport, check_parity
from bpkit.engine import (
    UnsupportedPrimitiveError,
    grad,
    register_fwd_bwd,
    register_nondiff,
    register_vjp,
    registered_primitives,
    value_and_grad,
    vjp,
)
from bpkit.rules.loops import while_checkpoints

__version__ = "0.1.0"

__all__ = [
    "vjp", "grad", "value_and_grad", "register_vjp", "register_fwd_bwd", "register_nondiff",
    "registered_primitives", "UnsupportedPrimitiveError", "check_parity", "ParityReport",
    "testing", "while_checkpoints",
]

from bpkit import models, nn, ops  # noqa: E402  (layers, fused ops, reference models)
from bpkit import train  # noqa: E402,F401  (bpkit.train: train steps, optimizers, the loop)

"""The engine: tracing, the forward pass, the reverse walk, the rule registry, JAX-version compat."""
from bpkit.engine.api import grad, value_and_grad, vjp
from bpkit.engine.core import vjp_jaxpr
from bpkit.engine.registry import (
    UnsupportedPrimitiveError,
    register_fwd_bwd,
    register_nondiff,
    register_vjp,
    registered_primitives,
)

__all__ = ["grad", "value_and_grad", "vjp", "vjp_jaxpr", "UnsupportedPrimitiveError",
           "register_vjp", "register_fwd_bwd", "register_nondiff", "registered_primitives"]

# Every rule is registered whenever the engine is imported (``import bpkit`` is lazy).
from bpkit import rules as _rules  # noqa: E402,F401

"""bpkit: backpropagation you can read.

A model is a pure JAX function of ``(params, batch)``; bpkit differentiates it with its own
reverse-mode engine and hand-written VJP rules (``bpkit/rules/``), proven equal to ``jax.grad``
and to float64 finite differences.

The package imports lazily (PEP 562): ``import bpkit`` is instant, and ``bpkit.grad``,
``bpkit.nn`` and the rest import JAX and register every rule on first use, so the ``bpkit``
command answers ``--version``, ``config show`` and config mistakes without importing JAX.
"""
import importlib

__version__ = "0.1.0"

# name -> the module that defines it (imported on first access)
_EXPORTS = {
    "vjp": "bpkit.engine", "grad": "bpkit.engine", "value_and_grad": "bpkit.engine",
    "register_vjp": "bpkit.engine", "register_fwd_bwd": "bpkit.engine",
    "register_nondiff": "bpkit.engine", "registered_primitives": "bpkit.engine",
    "UnsupportedPrimitiveError": "bpkit.engine",
    "check_parity": "bpkit.check", "ParityReport": "bpkit.check",
    "while_checkpoints": "bpkit.rules.loops",
    "per_example_grad_norms": "bpkit.per_example",
    "reuse_host_memory": "bpkit.host_memory",
}
_SUBMODULES = ("testing", "models", "nn", "ops", "train", "rules", "engine", "check", "data",
               "config", "validate", "sharding", "diagnostics", "debug", "per_example",
               "host_memory")

__all__ = [
    "vjp", "grad", "value_and_grad", "register_vjp", "register_fwd_bwd", "register_nondiff",
    "registered_primitives", "UnsupportedPrimitiveError", "check_parity", "ParityReport",
    "testing", "while_checkpoints", "per_example_grad_norms", "reuse_host_memory",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"bpkit.{name}")
    else:
        raise AttributeError(f"module 'bpkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))

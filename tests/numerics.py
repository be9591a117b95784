"""How users run training: float32 by default and standard dtype promotion.

The suite-wide settings in tests/conftest.py (x64, strict promotion) are meant for the rules;
optax's internals mix Python scalars and int32 counters, which strict promotion rejects. Tests
that train, benchmark or drive the CLI in-process run under ``user_numerics()``.
"""
import contextlib

import jax


@contextlib.contextmanager
def user_numerics():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with jax.numpy_dtype_promotion("standard"):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)

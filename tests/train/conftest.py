"""Training tests run as users run training: optax's internals mix Python scalars and int32
counters, which the suite-wide strict dtype promotion (meant for the rules) rejects; and
float32 is the default. Each test here runs with standard promotion and x64 off."""
import jax
import pytest


@pytest.fixture(autouse=True)
def training_numerics():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        with jax.numpy_dtype_promotion("standard"):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)

"""Strict settings for the whole suite (as Equinox does): they expose silent broadcasting and
dtype-promotion bugs in rules. float64 is enabled so references can be taken in double
precision; float32 cases pass explicit dtypes. Every rule's output is checked against its
primal's shape and dtype (the rule contract)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_enable_x64", True)

import bpkit.engine.core as _core  # noqa: E402

_core.CHECK_RULE_OUTPUTS = True

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so a CI result can be reproduced;
# HYPOTHESIS_PROFILE=explore draws new ones each run (how new counterexamples are found).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

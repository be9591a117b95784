"""Checks of bpkit's gradients: parity against jax.grad and float64 finite differences."""
from bpkit.check.parity import DEFAULT_TOLERANCES, LeafParity, ParityReport, check_parity

__all__ = ["check_parity", "ParityReport", "LeafParity", "DEFAULT_TOLERANCES"]

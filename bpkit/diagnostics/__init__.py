"""Diagnostics that only a hand-run backward pass can give: per-layer backward signals."""
from bpkit.diagnostics.signals import (
    LayerSignal,
    backward_signals,
    layer_names,
    layer_outputs,
    param_grad_norms,
    signal_warnings,
)

__all__ = ["LayerSignal", "backward_signals", "layer_names", "layer_outputs", "param_grad_norms", "signal_warnings"]

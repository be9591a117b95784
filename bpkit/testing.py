"""Test helpers for users' own code: assert that bpkit's gradients match the references."""
from __future__ import annotations

from bpkit.check.parity import check_parity


class ParityError(AssertionError):
    """bpkit's gradient disagrees with jax.grad or with finite differences."""


def assert_parity(fun, *args, **kwargs):
    """Raise ``ParityError`` with the full parity table (every leaf, every failure) unless
    ``bpkit.check_parity(fun, *args, **kwargs)`` passes; return the report otherwise."""
    report = check_parity(fun, *args, **kwargs)
    if not report.ok:
        raise ParityError("gradient parity failed:\n" + str(report))
    return report

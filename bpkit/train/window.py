"""The metrics of the steps since the last log line, and what non-finite values do to a run.

Every train step reports its ``loss`` and ``grad_norm`` (the global norm of the gradient,
computed inside the jitted step); with ``run.on_nonfinite=skip`` it also reports ``skipped``
(the step left the state unchanged because one of them was NaN or infinite). On the host:

* ``stop``: a non-finite loss *or* gradient norm raises ``NonFiniteLoss``; nothing new is
  saved, and the message says which checkpoint survives (or that none exists yet).
* ``skip``: skipped steps are counted (``skipped`` in each metrics line, ``skipped_steps`` in
  summary.json) and reported on stderr; ``run.max_skipped`` skips in a row raise
  ``TooManySkipped``. The device values are read every ``max_skipped`` steps at most, so the
  run stops soon after the limit.

A window's line holds the means over its steps that were not skipped (``null`` where none).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from bpkit.train.step import to_host


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm became NaN or infinite (``run.on_nonfinite=stop``)."""


class TooManySkipped(NonFiniteLoss):
    """``run.max_skipped`` updates in a row were skipped (``run.on_nonfinite=skip``)."""


def _finite(m: dict, key: str) -> bool:
    return key not in m or math.isfinite(m[key])


class MetricsWindow:
    """``add(step, device metrics)`` every step; ``check()`` applies the non-finite policy;
    ``take(step)`` returns the window's record (or ``None``) and starts a new window.
    ``survivor()`` is the sentence naming the checkpoint a stopped run leaves."""

    def __init__(self, policy: str, max_skipped: int, survivor: Callable[[], str],
                 warn: Callable[[str], None]):
        self.policy, self.max_skipped = policy, max_skipped
        self.survivor, self.warn = survivor, warn
        self.pending: list[tuple[int, Any]] = []     # device metrics, not yet read
        self.host: list[tuple[int, dict]] = []       # read and checked, not yet logged
        self.streak = 0                              # skipped steps in a row
        self.skipped_total = 0

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def due(self) -> bool:
        """Whether ``check`` should run now to honour ``max_skipped`` promptly."""
        return self.policy == "skip" and len(self.pending) >= self.max_skipped

    def check(self) -> None:
        while self.pending:
            s, m = self.pending.pop(0)
            m = to_host(m)
            self.host.append((s, m))
            if self.policy == "skip":
                self._count_skip(s, m)
            elif not (_finite(m, "loss") and _finite(m, "grad_norm")):
                what, key = (("loss", "loss") if not _finite(m, "loss")
                             else ("gradient norm", "grad_norm"))
                raise NonFiniteLoss(
                    f"non-finite {what} ({m[key]}) at step {s}; stopping without saving "
                    f"anything new (loss {m['loss']}, gradient norm {m.get('grad_norm')}). "
                    f"{self.survivor()} Lower optimizer.learning_rate or set "
                    "optimizer.clip_norm (in a new run.out_dir, or with run.resume=never), "
                    "or set run.on_nonfinite=skip to skip such updates")

    def _count_skip(self, s: int, m: dict) -> None:
        if not m.get("skipped"):
            self.streak = 0
            return
        self.streak += 1
        self.skipped_total += 1
        if self.streak >= self.max_skipped:
            raise TooManySkipped(
                f"{self.streak} updates in a row (steps {s - self.streak + 1}-{s}) had a "
                f"non-finite loss or gradient norm and were skipped (run.max_skipped="
                f"{self.max_skipped}); stopping without saving anything new. "
                f"{self.survivor()} Lower optimizer.learning_rate, set optimizer.clip_norm, "
                "or check the data for NaN/Inf")

    def take(self, step: int) -> dict | None:
        """The means of the window's metrics over its steps that were not skipped."""
        self.check()
        return self.record(step)

    def record(self, step: int | None = None) -> dict | None:
        """The window read so far (after ``check`` raised: up to the step that stopped the
        run, which is the record's ``step``), or ``None``."""
        if not self.host:
            return None
        step = self.host[-1][0] if step is None else step
        host, self.host = self.host, []
        good = [m for _, m in host if not m.get("skipped")]
        keys = [k for k in host[-1][1] if k != "skipped"]
        rec = {k: float(np.mean([m[k] for m in good])) if good else float("nan") for k in keys}
        if "skipped" in host[-1][1]:
            skipped = [s for s, m in host if m.get("skipped")]
            rec["skipped"] = len(skipped)
            if skipped:
                shown = ", ".join(map(str, skipped[:8])) + (", ..." if len(skipped) > 8 else "")
                self.warn(f"warning: {len(skipped)} of {len(host)} updates up to step {step} "
                          f"skipped (non-finite loss or gradient norm at step {shown}); "
                          f"{self.streak} in a row now, run.max_skipped={self.max_skipped}")
        return {"step": step, **rec}

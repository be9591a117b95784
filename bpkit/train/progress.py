"""Progress of a run on the console: a tqdm bar on a terminal, log lines otherwise.

Compilation is timed apart: the first step of a run (or of a resumed run) traces and
compiles the jitted step, which can take longer than hundreds of later steps, so it is
reported once ("compiled in 16.2 s") and left out of the throughput and the ETA. The bar is
started after it; the ETA is the remaining steps at the mean step time since then. Numbers
are printed with 4 significant digits (``fmt``), throughput as whole examples per second.
"""
from __future__ import annotations

import datetime
import sys
import time
from typing import Callable

METRIC_ORDER = ("loss", "accuracy", "d_loss", "g_loss", "grad_norm", "learning_rate")


def fmt(x) -> str:
    """4 significant digits, trailing zeros kept so columns read alike: ``1.000``,
    ``0.4680``, ``0.0001000``, ``1.235e+04``; ``n/a`` for ``None``."""
    if x is None:
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{float(x):#.4g}"


def fmt_metrics(m: dict) -> str:
    return "  ".join(f"{k} {fmt(m[k])}" for k in METRIC_ORDER if m.get(k) is not None)


def fmt_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class Progress:
    """``compiling()`` before the first step, ``compiled(step)`` after it returns, then
    ``update(step)`` after every step and ``window(step, metrics)`` at each log point (the
    line, or the bar's postfix); ``write(msg)`` prints above the bar; ``close()``.

    ``mode``: ``bar`` or ``log``; ``clock``: seconds (injectable for tests)."""

    def __init__(self, total: int, start: int, batch_size: int, mode: str,
                 out: Callable[[str], None] = print, clock: Callable[[], float] = time.time):
        self.total, self.batch_size, self.mode = total, batch_size, mode
        self.out, self.clock = out, clock
        self.bar = None
        self.t_compile = None           # when the first step was dispatched
        self.compile_seconds = None
        self.t0, self.step0 = None, start   # after the first step: the timing origin
        self.t_window, self.step_window = None, start

    def compiling(self) -> None:
        self.t_compile = self.clock()

    def compiled(self, step: int) -> None:
        """The first step has returned: report its time, start the clock (and the bar)."""
        now = self.clock()
        self.compile_seconds = now - (self.t_compile if self.t_compile is not None else now)
        self.out(f"  compiled in {self.compile_seconds:.1f} s (the first step: tracing and "
                 "XLA compilation; left out of the throughput and the ETA)")
        self.t0 = self.t_window = now
        self.step0 = self.step_window = step
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=step, dynamic_ncols=True, unit="step",
                            file=sys.stderr)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def rate(self, step: int) -> float | None:
        """Examples per second since the previous window (``None`` before any step after
        the first)."""
        now = self.clock()
        if self.t_window is None or step <= self.step_window:
            return None
        r = (step - self.step_window) * self.batch_size / max(now - self.t_window, 1e-9)
        self.t_window, self.step_window = now, step
        return r

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean step time since the first step."""
        if self.t0 is None or step <= self.step0:
            return None
        per_step = (self.clock() - self.t0) / (step - self.step0)
        return per_step * (self.total - step)

    def window(self, step: int, metrics: dict) -> float | None:
        """Report the logging window ending at ``step``; returns its throughput."""
        eta = self.eta(step)
        rate = self.rate(step)
        speed = f"{rate:,.0f} ex/s" if rate is not None else "- ex/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{fmt_metrics({'loss': metrics.get('loss')})}  {speed}")
        else:
            left = f"  ETA {fmt_duration(eta)}" if eta is not None and step < self.total else ""
            self.out(f"step {step:>6}/{self.total}  {fmt_metrics(metrics)}  {speed}{left}")
        return rate

    def write(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else self.out)(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
